"""What is evaluated: one task per adapter (its eval split, data format, metrics and gates)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from phi_pipeline.orchestration.cache import file_sha256
from phi_pipeline.pipeline_spec.data import Example, load_examples
from phi_pipeline.errors import UsageError
from phi_pipeline.pipeline_spec.schema import DataSpec, EvalSpec, GateSpec, PipelineSpec

if TYPE_CHECKING:
    from phi_pipeline.pipeline_spec.plan import Plan


@dataclass(frozen=True)
class EvalTask:
    """One adapter's evaluation: its eval split, how rows become text, its metric and gates."""

    adapter: str
    data: DataSpec
    eval: EvalSpec
    gates: GateSpec
    eval_file: Path | None
    """The local eval file (data.eval, or `phi-pipeline eval --data`); None for a hub split."""
    expected_sha256: str | None = None
    """The eval split's sha256 when the bundle was built (manifest.json), to notice a changed file."""

    @property
    def gate_metric(self) -> str:
        """The metric the gates compare: the gates' own, else the first of eval.metric."""
        return self.gates.metric or self.eval.metric[0]

    @property
    def source(self) -> str:
        """The eval split as the report names it: a file path, or hub:<name>:<split>."""
        if self.eval_file is not None:
            return self.eval_file.as_posix()
        return f"hub:{self.data.hub}" + (f"/{self.data.subset}" if self.data.subset else "") + f":{self.data.eval_split}"

    def source_digest(self) -> str:
        """sha256 of the eval file (a hub split: its name, as the manifest records it)."""
        return file_sha256(self.eval_file) if self.eval_file is not None else self.source

    def missing(self) -> bool:
        return self.eval_file is not None and not self.eval_file.is_file()

    @property
    def separator(self) -> str:
        """What the training text had between the prompt and the answer."""
        if self.data.messages_field:
            return ""
        template, field_ = self.data.text_template or "", self.data.response_field or ""
        before = template[: template.rindex("{" + field_ + "}")]
        return before[len(before.rstrip(" ")) :]

    def examples(self) -> list[Example]:
        try:
            rows = load_examples(self.data, "eval", self.eval_file)
        except (ValueError, KeyError) as exc:
            raise UsageError(self.source, [f"cannot read the eval split of adapter {self.adapter!r}: {exc}"])
        return rows[: self.eval.max_examples] if self.eval.max_examples else rows


def tasks_from_plan(plan: "Plan") -> list[EvalTask]:
    return [EvalTask(a.name, a.spec.data, a.spec.eval, a.spec.gates, _eval_file(a.spec.data)) for a in plan.adapters]


def _eval_file(data: DataSpec) -> Path | None:
    return Path(data.eval) if data.hub is None and data.eval else None


def tasks_from_manifest(
    manifest: Mapping[str, Any],
    *,
    spec: PipelineSpec | None = None,
    adapter: str | None = None,
    data_file: str | Path | None = None,
) -> list[EvalTask]:
    """Tasks for a published bundle: data format, eval settings and gates from its manifest (or from
    `spec` for bundles whose manifest predates them); `data_file` replaces the adapter's eval split."""
    entries = list(manifest.get("adapters", []))
    names = [a["name"] for a in entries]
    if adapter is not None:
        if adapter not in names:
            raise UsageError("--adapter", [f"no adapter {adapter!r}; this bundle has {', '.join(names)}"])
        entries = [a for a in entries if a["name"] == adapter]
    if data_file is not None and len(entries) != 1:
        raise UsageError("--data", [f"the bundle has {len(entries)} adapters; say which one --data is for with --adapter"])
    spec_adapters = {a.name: a for a in spec.adapters} if spec else {}
    tasks, problems = [], []
    for entry in entries:
        name = entry["name"]
        if spec is not None:
            if name not in spec_adapters:
                problems.append(f"adapter {name!r} is not in the spec")
                continue
            a = spec_adapters[name]
            data, eval_spec, gates = a.data, a.eval, a.gates
        else:
            ds = entry.get("dataset", {})
            if not any(k in ds for k in ("messages_field", "text_template")):
                problems.append(
                    f"adapter {name!r}: the manifest does not record its data format (built before evaluation "
                    "existed); pass --spec with the pipeline spec it was built from"
                )
                continue
            data = DataSpec(**{k: ds[k] for k in DataSpec.model_fields if ds.get(k) is not None})
            eval_spec = EvalSpec(**entry.get("eval", {}))
            gates = GateSpec(**entry.get("gates", {}))
        path = Path(data_file) if data_file is not None else _eval_file(data)
        expected = None if data_file is not None else entry.get("dataset", {}).get("eval_sha256")
        tasks.append(EvalTask(name, data, eval_spec, gates, path, expected))
    if problems:
        raise UsageError("manifest.json", problems)
    return tasks
