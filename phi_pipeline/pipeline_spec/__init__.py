"""Stage 1, what to build: the pipeline spec, the targets table, the plan, paths and the input data.

- schema.py: the pydantic models of a pipeline spec (``extra="forbid"``, every field described) and
  ``load_spec``, which reports every problem of a file at once with its line;
- targets.py: the one table of targets (execution provider, precisions, layouts, install extras);
  plain Python, so the Makefile reads it with the system interpreter;
- plan.py: spec + target -> Plan (what each stage does, where its files go, what must be installed);
- paths.py: the run's folders (work dir, cache, locks, split files);
- data.py: reading and checking the datasets (JSON Lines / arrays / hub splits), validation cuts;
- inputs.py: checks of the inputs a run reads before it starts (base model weights, hub cache).

May import: ``phi_pipeline.errors``, ``phi_pipeline.tiny`` (the built-in bases' configs). Never torch,
olive or onnxruntime at module level: validating a spec takes well under a second.
"""
