"""`phi-pipeline bench`: what an exported bundle buys a user, measured side by side (GitHub issue 6).

- models.py: a Phi-3-shaped benchmark base with random weights and random LoRA adapters, exported
  to int4 and fp32 bundles through the pipeline's own code (Plan, export workflow, `olive run`,
  adapter conversion, bundle staging and verification).
- decode.py: one configuration (engine, precision, adapter, session threads) per subprocess, so
  peak RSS belongs to that configuration alone; time to first token, decode tokens/s, adapter
  switch and load times.
- roofline.py: the machine's copy bandwidth and the weight bytes a decode step reads.
- pipeline_costs.py: wall time of each pipeline stage vs the same Olive workflows run by hand.
- accuracy.py: accuracy proxies of the int4 export against the fp32 one on random prompts.
- peer.py: `--peer llama.cpp`: llama.cpp built from a pinned source, the same model as GGUF, rounds
  interleaved with the bundle as shipped.
- report.py: results.json -> report.md and a PNG chart.
- run.py: the whole benchmark, in the order above.

Every figure is a median over repeated runs with its min and max; every ratio is computed from
runs of one invocation, and the load average is recorded next to it (other work on the machine
moves the numbers).

May import every stage and the orchestration (``phi_pipeline.pipeline``): it measures them. Only
``cli.py`` imports it.
"""
