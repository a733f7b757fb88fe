"""Hyperparameter search over an adapter's lora/training settings.

Optuna proposes trials (its samplers and SQLite storage make a study reproducible and resumable);
Olive trains each trial as an ordinary fine-tune workflow; the validation split scores it. What
neither library does — mapping a spec's search space onto Optuna, keying trials by content,
recording failures and picking the adapter to ship — is here.

May import: ``evaluate`` (metrics that score trials), ``bundle``, ``orchestration``, ``pipeline_spec``, ``errors``.
"""
