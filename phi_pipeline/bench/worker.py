"""The subprocess that measures one decode configuration (decode.run_config starts it): one
configuration per process, so its peak RSS and threads are its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from phi_pipeline.bench import adapter_costs
from phi_pipeline.bench.decode import DecodeConfig, measure_decode, peak_rss_bytes


def measure(config: DecodeConfig) -> dict[str, Any]:
    """What the subprocess does for one configuration (callable in-process, e.g. by tests)."""
    if config.mode == "decode":
        result = measure_decode(config)
    else:
        result = adapter_costs.MODES[config.mode](config)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def main(argv: list[str] | None = None) -> int:
    cfg_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    raw = json.loads(Path(cfg_path).read_text())
    raw["prompt_lens"] = tuple(raw["prompt_lens"])
    Path(out_path).write_text(json.dumps(measure(DecodeConfig(**raw)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
