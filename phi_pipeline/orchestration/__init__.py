"""Stage 2, running Olive: workflow configs, the runner, the content-keyed cache and what a run needs.

- workflows/: pure (plan -> Olive workflow dict) builders, one module per stage; configs.py writes them
  to ``olive_configs/`` and names their files;
- runner.py: starts ``olive run`` (the only place Olive is started); olive_compat.py: the shim that
  makes Olive 0.13 work with onnxruntime-genai 0.18 (the only place Olive is patched);
- executors.py (local, torchrun, Ray), distributed/ (data-parallel fine-tunes under torchrun);
- cache.py (content-keyed, verified entries) and keys.py (what a training's key is made of);
- runlock.py, diskspace.py, progress.py: one run at a time, enough disk, stage timings;
- trained.py: what a finished fine-tune left (its adapter and trainer state).

May import: ``phi_pipeline.pipeline_spec``, ``errors``, ``versions``, ``tiny``. Never a later stage.
"""
