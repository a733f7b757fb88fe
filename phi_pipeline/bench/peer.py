"""`phi-pipeline bench --peer llama.cpp`: the bundle against llama.cpp on the same model (GitHub issue 12).

- build: llama.cpp from the source the llama-cpp-python sdist vendors (version pinned in pyproject.toml's
  [tool.phi-pipeline.peer]), built once with cmake into the bench work dir (llama-bench, llama-quantize,
  llama-completion).
- convert: the benchmark base to GGUF (f32, then Q4_0 and Q4_K_M with llama-quantize) and its r8 PEFT
  adapter to a GGUF LoRA, with llama.cpp's own converters. Its Phi-3 converter reads a SentencePiece
  `tokenizer.model`, which the benchmark base (a byte-level BPE tokenizer.json) lacks: one is trained
  with `sentencepiece` whose first ids are the base's special tokens, in a folder that links the base's
  weights beside it.
- rounds: each round runs the bundle as shipped (no adapter, r8), llama.cpp (Q4_0, Q4_K_M with
  llama-bench; Q4_0 with and without the LoRA with llama-completion) and the variants tried
  (tuning.py), in a seeded random order, so every ratio pairs runs of the same round; ratios are
  medians of the per-round ratios.

llama.cpp's figures: decode = llama-bench's text generation of `new_tokens` tokens after `prompt`
tokens of context (`-d`), first token = its prompt processing time for `prompt` tokens (the bundle's
TTFT also counts generator creation and sampling the first token). With a LoRA, llama-bench has no
adapter option, so both LoRA rows come from llama-completion's own timings (prompt eval, eval).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import tomllib

from phi_pipeline.bench.accuracy import compare
from phi_pipeline.orchestration.diskspace import tree_size
from phi_pipeline.bundle.layout import ADAPTERS_DIR
from phi_pipeline.evaluate.speed import measure_rounds
from phi_pipeline.pipeline_spec.schema import SPEC_VARIANT, ExportSearchSpec
from phi_pipeline.evaluate.stats import paired_ratio, summary
from phi_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from phi_pipeline.bench.options import BenchOptions

PEERS = ("llama.cpp",)
# llama-server: the serving bench's peer (bench/serving.py); llama-perplexity and llama-tokenize: the
# real-weights comparison's quality on the same tokens (bench/real_peer.py)
TOOLS = ("llama-bench", "llama-quantize", "llama-completion", "llama-server", "llama-perplexity", "llama-tokenize")
QUANTS = ("Q4_0", "Q4_K_M")
LORA_QUANT = "Q4_0"  # the llama.cpp quantization the adapter rows run on
BUILD_STAMP = "built.json"
# Without ggml's AMX kernels: on an AMX-advertising Xeon VM (2026-12-06) their tinygemm_kernel_amx died on
# SIGILL at its first tile load (llama-perplexity, llama-completion on the Q4_1 SmolLM2 GGUF) although a plain
# AMX tile load ran there; native AVX-512/VNNI code stays, as onnxruntime's int4 MatMulNBits kernels use.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() in ("x86_64", "AMD64") else ""
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
    *((f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}") if NO_AMX else ()),
)


# llama-completion logs through an asynchronous logger that it never flushes: with a short run the
# process exits before the logger thread has written the timings (common/log.h: "Call common_log_flush()
# before exit if you want to ensure all logs are flushed"). The one source edit the peer's build makes.
FLUSH_PATCH = {
    "file": "tools/completion/completion.cpp",
    "after": "    common_perf_print(ctx, smpl);\n",
    "insert": "    common_log_flush(common_log_main());\n",
    "why": "llama-completion flushes its log before exit (its perf print was lost on short runs)",
}


def patch_source(source: Path) -> None:
    """Apply FLUSH_PATCH to an extracted llama.cpp source tree (idempotent); an unexpected source is an error."""
    path = source / FLUSH_PATCH["file"]
    text = path.read_text()
    anchor = FLUSH_PATCH["after"]
    if anchor + FLUSH_PATCH["insert"] in text:
        return
    if text.count(anchor) != 1:
        raise PeerError(f"{path}: expected one line {anchor.strip()!r} to patch after; a different llama.cpp source?")
    path.write_text(text.replace(anchor, anchor + FLUSH_PATCH["insert"]))


class PeerError(PipelineError):
    """The peer could not be built, converted or run; the message names the log to read."""


def pinned_version(project_root: Path) -> str:
    """The llama-cpp-python sdist whose vendored llama.cpp is the peer (pyproject.toml)."""
    path = project_root / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())["tool"]["phi-pipeline"]["peer"]["llama-cpp-python"]
    except (OSError, KeyError) as exc:
        raise PeerError(f"{path}: no [tool.phi-pipeline.peer] llama-cpp-python pin ({exc!r}); run from the project root") from None


@dataclass(frozen=True)
class LlamaCpp:
    home: Path
    """<bench work dir>/llama.cpp/<version>: source/, build/, the build logs and stamp."""

    @property
    def source(self) -> Path:
        return self.home / "source"

    @property
    def bin(self) -> Path:
        return self.home / "build" / "bin"

    def tool(self, name: str) -> Path:
        return self.bin / name

    def build_record(self) -> dict[str, Any]:
        """What a build is made of: a build stamped with another record is rebuilt."""
        return {"llama-cpp-python": self.home.name, "tools": list(TOOLS), "cmake_options": list(CMAKE_OPTIONS),
                "patches": [FLUSH_PATCH["why"]]}

    @property
    def built(self) -> bool:
        try:
            stamped = json.loads((self.home / BUILD_STAMP).read_text())
        except (OSError, ValueError):
            return False
        return stamped == self.build_record() and all(self.tool(t).is_file() for t in TOOLS)


def llama_cpp_home(work_dir: Path, version: str) -> LlamaCpp:
    return LlamaCpp(work_dir / "llama.cpp" / version)


def _run(cmd: list[str], log: Path, *, env: dict[str, str] | None = None) -> None:
    """Run `cmd` with its output in `log`; a failure raises PeerError with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise PeerError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")


def build(work_dir: Path, version: str, say: Callable[[str], None]) -> LlamaCpp:
    """llama.cpp built once per version: pip fetches the sdist, cmake builds TOOLS (minutes)."""
    peer = llama_cpp_home(work_dir, version)
    if peer.built:
        return peer
    home = peer.home
    home.mkdir(parents=True, exist_ok=True)
    if not (peer.source / "CMakeLists.txt").is_file():
        say(f"fetching llama-cpp-python {version} (sdist) for its vendored llama.cpp")
        download = home / "download"
        shutil.rmtree(download, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", str(download)], home / "pip-download.log")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        partial = home / "source.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(next(download.glob("*.tar.gz"))) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(partial, members=[m for m in members if m.name], filter="data")
        shutil.rmtree(peer.source, ignore_errors=True)
        partial.rename(peer.source)
        shutil.rmtree(download)
    patch_source(peer.source)
    say(f"building llama.cpp ({', '.join(TOOLS)}) with cmake: about 5 minutes on 2 cores")
    jobs = str(os.cpu_count() or 1)
    shutil.rmtree(home / "build", ignore_errors=True)  # a build of another record (or copied from elsewhere)
    (home / BUILD_STAMP).unlink(missing_ok=True)
    _run(["cmake", "-S", str(peer.source), "-B", str(home / "build"), *CMAKE_OPTIONS], home / "cmake-configure.log")
    _run(["cmake", "--build", str(home / "build"), "-j", jobs, "--target", *TOOLS], home / "cmake-build.log")
    (home / BUILD_STAMP).write_text(json.dumps(peer.build_record(), indent=2) + "\n")
    return peer


# --- the benchmark base as llama.cpp reads it -------------------------------------------------------

def sentencepiece_model(hf_dir: Path, out: Path, *, seed: int = 0) -> Path:
    """Train a SentencePiece model for `hf_dir`'s tokenizer: its special tokens (which must be ids
    0..k-1, as in the tiny base) keep their ids, the first as <unk>; the rest of the vocabulary is
    learned from text decoded from random ids of that tokenizer. The GGUF converter pads the
    vocabulary to the model's vocab_size, so only the special ids need to agree."""
    import numpy as np
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model_vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    specials = sorted(tokenizer.added_tokens_decoder.items())
    if [i for i, _ in specials] != list(range(len(specials))) or not specials:
        raise PeerError(f"{hf_dir}: special tokens {[(i, t.content) for i, t in specials]} are not ids 0..k-1; "
                        "cannot train a matching SentencePiece tokenizer.model")
    rng = np.random.default_rng(seed)
    ids = np.arange(len(specials), len(tokenizer))
    lines = [tokenizer.decode(rng.choice(ids, 24).tolist()) for _ in range(4000)]
    out.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out.with_suffix("")), model_type="bpe",
        # a soft limit (room for the 256 byte pieces and every character of a small tokenizer's text),
        # never above the model's rows: the converter indexes its table by piece id
        vocab_size=min(max(len(tokenizer), 512), model_vocab), hard_vocab_limit=False,
        unk_id=0, unk_piece=specials[0][1].content, bos_id=-1, eos_id=-1, pad_id=-1,
        # byte pieces: llama.cpp's SPM tokenizer spells any piece it lacks (the leading "▁" too) in
        # them, and aborts (unordered_map::at) where they are missing
        byte_fallback=True,
        user_defined_symbols=[t.content for _, t in specials[1:]], minloglevel=2,
    )
    return out


def gguf_input(base: Path, out: Path) -> Path:
    """A folder llama.cpp's converters read as the base: links to `base`'s files plus tokenizer.model."""
    if not (out / "tokenizer.model").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in base.iterdir():
            if f.is_file():
                (out / f.name).symlink_to(f.resolve())
        sentencepiece_model(base, out / "tokenizer.model")
    return out


@dataclass(frozen=True)
class PeerModels:
    gguf: dict[str, Path]
    """quantization -> model file"""
    lora: Path


def convert(peer: LlamaCpp, base: Path, peft_adapter: Path, work: Path, say: Callable[[str], None]) -> PeerModels:
    """The base to GGUF (f32 -> each of QUANTS) and the PEFT adapter to a GGUF LoRA (f32, like the
    bundle's .onnx_adapter); reused while the base's bench stamp is unchanged."""
    from phi_pipeline.bench.models import built_from, stamp

    record = {"base": json.loads((base / "bench_record.json").read_text())["record"],
              "adapter": json.loads((peft_adapter.parent / "bench_record.json").read_text())["record"],
              "llama.cpp": peer.home.name, "quants": list(QUANTS), "tokenizer.model": "bpe, byte fallback"}
    models = PeerModels({q: work / f"base-{q}.gguf" for q in QUANTS}, work / "lora-r8-f32.gguf")
    if built_from(work, record) is not None and all(p.is_file() for p in [*models.gguf.values(), models.lora]):
        return models
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hf = gguf_input(base, work / "hf")
    env = os.environ | {"PYTHONPATH": str(peer.source / "gguf-py")}
    say("converting the benchmark base to GGUF (f32) with convert_hf_to_gguf.py")
    f32 = work / "base-f32.gguf"
    _run([sys.executable, str(peer.source / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32", "--outfile", str(f32)],
         work / "convert.log", env=env)
    for q, path in models.gguf.items():
        say(f"llama-quantize {q}")
        _run([str(peer.tool("llama-quantize")), str(f32), str(path), q], work / f"quantize-{q}.log")
    f32.unlink()
    say("converting the r8 adapter with convert_lora_to_gguf.py")
    convert_lora(peer, hf, peft_adapter, models.lora)
    stamp(work, record)
    return models


def convert_lora(peer: LlamaCpp, hf: Path, peft_adapter: Path, out: Path) -> Path:
    """A PEFT adapter as a GGUF LoRA (f32, like the bundle's .onnx_adapter) for the base in `hf` (gguf_input)."""
    env = os.environ | {"PYTHONPATH": str(peer.source / "gguf-py")}
    _run([sys.executable, str(peer.source / "convert_lora_to_gguf.py"), str(peft_adapter), "--base", str(hf),
          "--outtype", "f32", "--outfile", str(out)], out.with_suffix(".log"), env=env)
    return out


# --- measurements -----------------------------------------------------------------------------------

def llama_bench(peer: LlamaCpp, model: Path, opts: "BenchOptions", log: Path) -> dict[str, dict[str, float]]:
    """One llama-bench repetition: {prompt: {"ttft_s", "decode_tok_s"}} for each prompt length."""
    lens = ",".join(map(str, opts.prompt_lens))
    common = [str(peer.tool("llama-bench")), "-m", str(model), "-t", str(opts.threads), "-r", "1", "-o", "json"]
    out: dict[str, dict[str, float]] = {str(n): {} for n in opts.prompt_lens}
    logged = []
    for args, key in ((["-p", lens, "-n", "0"], "pp"), (["-p", "0", "-n", str(opts.new_tokens), "-d", lens], "tg")):
        proc = subprocess.run([*common, *args], capture_output=True, text=True)
        logged.append(proc.stdout + proc.stderr)
        log.write_text("\n".join(logged))
        if proc.returncode != 0:
            raise PeerError(f"llama-bench failed (exit {proc.returncode}); log {log}:\n{proc.stderr[-2000:]}")
        for test in json.loads(proc.stdout):
            if key == "pp":
                out[str(test["n_prompt"])]["ttft_s"] = test["avg_ns"] / 1e9
            else:
                out[str(test["n_depth"])]["decode_tok_s"] = test["avg_ts"]
    return out


# Lines of common_perf_print, after llama.cpp's log prefix (a timestamp and level where enabled).
_PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_EVAL = re.compile(r"(?<!prompt )eval time =\s*([\d.]+) ms /\s*(\d+) runs")


def parse_completion_timings(text: str) -> dict[str, float]:
    """llama-completion's perf print (llama_perf_context_print) -> {"ttft_s", "prompt_tokens", "decode_tok_s"}:
    the prompt evaluation yields the first token, each later "run" one more."""
    prompts, evals = _PROMPT_EVAL.findall(text), _EVAL.findall(text)
    if not prompts or not evals:
        raise PeerError(f"no llama.cpp timings in its output:\n{text[-1500:]}")
    (p_ms, p_tokens), (ms, runs) = prompts[-1], evals[-1]
    return {"ttft_s": float(p_ms) / 1000, "prompt_tokens": int(p_tokens),
            "decode_tok_s": int(runs) / (float(ms) / 1000) if float(ms) else 0.0}


def prompt_text(hf: Path, length: int, seed: int = 0) -> str:
    """Text that the GGUF's (SentencePiece) vocabulary reads as about `length` tokens of random pieces."""
    import numpy as np
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    special = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)
               or sp.id_to_piece(i).startswith("<|")}  # and the chat tokens, which llama.cpp would parse as such
    normal = [i for i in range(sp.get_piece_size()) if i not in special]
    ids = np.random.default_rng(seed + length).choice(normal, 2 * length).tolist()
    return sp.decode(sp.encode(sp.decode(ids))[: length - 1])  # llama.cpp adds BOS


def llama_completion(peer: LlamaCpp, model: Path, prompt_file: Path, opts: "BenchOptions", log: Path,
                     lora: Path | None = None) -> dict[str, float]:
    """One llama-completion request's own timings (its perf print, flushed at exit by FLUSH_PATCH)."""
    cmd = [str(peer.tool("llama-completion")), "-m", str(model), "-f", str(prompt_file), "-n", str(opts.new_tokens),
           "--ignore-eos", "--temp", "0", "-t", str(opts.threads), "-no-cnv", "--perf"]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
    text = proc.stdout + proc.stderr
    log.write_text(text)
    if proc.returncode != 0:
        raise PeerError(f"llama-completion failed (exit {proc.returncode}); log {log}:\n{proc.stderr[-2000:]}")
    return parse_completion_timings(text)


_FINAL_PPL = re.compile(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)")


def parse_perplexity(text: str) -> dict[str, float]:
    """llama-perplexity's output -> {"perplexity", "plus_minus"} (its final estimate)."""
    found = _FINAL_PPL.search(text)
    if not found:
        raise PeerError(f"no final perplexity estimate in llama-perplexity's output:\n{text[-1500:]}")
    return {"perplexity": float(found[1]), "plus_minus": float(found[2])}


def llama_perplexity(peer: LlamaCpp, model: Path, text_file: Path, ctx: int, threads: int, log: Path) -> dict[str, float]:
    """Perplexity of `text_file` as llama.cpp computes it: chunks of `ctx` tokens, see chunked_perplexity."""
    _run([str(peer.tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
          "-t", str(threads)], log)
    return parse_perplexity(log.read_text())


def llama_tokens(peer: LlamaCpp, model: Path, text_file: Path, log: Path) -> list[int]:
    """llama.cpp's token ids of a text file, as llama-perplexity reads it (a BOS only where the model adds one)."""
    proc = subprocess.run([str(peer.tool("llama-tokenize")), "-m", str(model), "-f", str(text_file), "--ids",
                           "--log-disable"], capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise PeerError(f"llama-tokenize failed (exit {proc.returncode}); log {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chunked_perplexity(logits_from: Callable[[list[int], int], Any], chunks: list[list[int]]) -> float:
    """llama-perplexity's score over whole chunks of token ids (tools/perplexity/perplexity.cpp): each chunk is
    run from an empty cache and only its second half is scored, token j+1 from the logits at position j for
    j >= len(chunk) // 2, so every scored token has at least half a chunk of context. `logits_from(ids, first)`
    gives the logits at positions first.. of `ids` (GenaiModel.logits)."""
    from phi_pipeline.evaluate.onnx_side import token_nll

    nll, count = 0.0, 0
    for ids in chunks:
        first = len(ids) // 2
        nll += token_nll(logits_from(ids, first)[:-1], ids[first + 1:])
        count += len(ids) - 1 - first
    return math.exp(nll / count)


def _bundle_round(bundle: Path, adapter: Path | None, opts: "BenchOptions", scratch: Path, label: str,
                  session_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request per prompt length on the bundle as shipped (its genai_config.json's threads), or
    with `session_options` laid over its decoder's."""
    from phi_pipeline.bench.decode import DecodeConfig, run_config

    cfg = DecodeConfig(label, "onnx", str(bundle), adapter=str(adapter) if adapter else None, threads=None,
                       prompt_lens=opts.prompt_lens, new_tokens=opts.new_tokens, reps=1, device="cpu",
                       session_options=session_options or {})
    result = run_config(cfg, scratch)
    if "error" in result:
        raise PeerError(result["error"])
    return {n: {"ttft_s": p["ttft_s"]["median"], "decode_tok_s": p["decode_tok_s"]["median"]}
            for n, p in result["prompts"].items() if "skipped" not in p} | {"peak_rss_bytes": result["peak_rss_bytes"]}


# Rows of the comparison: (name, engine, quantization, adapter, tool).
ROWS = (
    ("bundle int4", "onnxruntime-genai", "int4", None, "bench.decode"),
    ("bundle int4 + r8", "onnxruntime-genai", "int4", "r8", "bench.decode"),
    ("llama.cpp Q4_0", "llama.cpp", "Q4_0", None, "llama-bench"),
    ("llama.cpp Q4_K_M", "llama.cpp", "Q4_K_M", None, "llama-bench"),
    ("llama.cpp Q4_0 (llama-completion)", "llama.cpp", "Q4_0", None, "llama-completion"),
    ("llama.cpp Q4_0 + r8 (llama-completion)", "llama.cpp", "Q4_0", "r8", "llama-completion"),
)


def summarize(rounds: dict[str, list[dict[str, Any]]], sizes: dict[str, int], prompt_lens: tuple[int, ...],
              shipped: str = "bundle int4") -> dict[str, Any]:
    """Rows (median [min-max] over rounds) and the paired ratios the issue asks for, of the `shipped` row
    (the export search's winner) against llama.cpp."""
    rows = []
    for name, engine, quant, adapter, tool in ROWS:
        results = rounds[name]
        prompts = {
            str(n): {key: summary([r[str(n)][key] for r in results if str(n) in r and key in r[str(n)]], digits=4)
                     for key in ("ttft_s", "decode_tok_s")}
            for n in prompt_lens
        }
        rss = [r["peak_rss_bytes"] for r in results if r.get("peak_rss_bytes")]
        rows.append({"name": name, "engine": engine, "quantization": quant, "adapter": adapter, "tool": tool,
                     "prompts": prompts, "peak_rss_bytes": max(rss) if rss else None})
    ratios: dict[str, Any] = {}
    bundle, q40 = rounds[shipped], rounds["llama.cpp Q4_0"]
    for n in map(str, prompt_lens):
        ratios[f"decode_vs_llama_q4_0@{n}"] = paired_ratio(bundle, q40, n, "decode_tok_s")
        ratios[f"decode_vs_llama_q4_k_m@{n}"] = paired_ratio(bundle, rounds["llama.cpp Q4_K_M"], n, "decode_tok_s")
        ratios[f"first_token_speed_vs_llama_q4_0@{n}"] = paired_ratio(bundle, q40, n, "ttft_s", invert=True)
        ratios[f"adapter_decode_cost_bundle@{n}"] = _cost(rounds["bundle int4 + r8"], bundle, n)
        ratios[f"adapter_decode_cost_llama_cpp@{n}"] = _cost(rounds["llama.cpp Q4_0 + r8 (llama-completion)"],
                                                            rounds["llama.cpp Q4_0 (llama-completion)"], n)
        ratios[f"decode_vs_llama_q4_0_with_r8@{n}"] = paired_ratio(
            rounds["bundle int4 + r8"], rounds["llama.cpp Q4_0 + r8 (llama-completion)"], n, "decode_tok_s")
    ratios["size_vs_llama_q4_0"] = round(sizes["bundle_int4"] / sizes["gguf_Q4_0"], 4)
    ratios["size_vs_llama_q4_k_m"] = round(sizes["bundle_int4"] / sizes["gguf_Q4_K_M"], 4)
    return {"rows": rows, "ratios": ratios}


# The bench bases have random weights and no task: the export search's gates there are accuracy proxies
# against the fp32 export (accuracy.py), bounded above what the shipped int4 recipe measured on the 150M
# Phi-3-shaped base (perplexity ratio 1.24, KL 0.029 nats/token: bench/report.md of 2026-12-02).
BENCH_GATES = {"perplexity_ratio": 1.30, "kl_nats_per_token": 0.05}


def search_candidates() -> list[Any]:
    """The export search's default candidates (the shipped specs' own)."""
    return ExportSearchSpec().candidates


def search_row(variant: str) -> str:
    """The peer round row that times an export-search variant (`spec` is the bundle as built)."""
    return "bundle int4" if variant == SPEC_VARIANT else f"export search: {variant}"


def export_search(proxies: dict[str, dict[str, Any]], rounds: dict[str, list[dict[str, Any]]], sizes: dict[str, int],
                  opts: "BenchOptions") -> dict[str, Any]:
    """The run's export-search choice (search/export.py) over the bench variants: gated by BENCH_GATES on
    the accuracy proxies, timed in the peer's rounds."""
    from phi_pipeline.bench import tuning
    from phi_pipeline.search.export import Variant, choose, timing_context

    by_name = {c.name: c.changes for c in search_candidates()}
    variants = []
    for name, p in proxies.items():
        values = {"perplexity_ratio": p.get("perplexity_ratio"),
                  "kl_nats_per_token": (p.get("kl_nats_per_token") or {}).get("median")}
        failures = [f"{name}: {k} {v} > {bound}" if v is not None else f"{name}: {k} not measured ({p.get('error', '')[-200:]})"
                    for k, bound in BENCH_GATES.items() if (v := values[k]) is None or v > bound]
        variants.append(Variant(name, by_name.get(name, {}), not failures, failures, None, values["perplexity_ratio"],
                                (p.get("token_agreement") or {}).get("median"), sizes[name]))
    # the rounds are the peer's own (choose() counts them); the spec's bound on rounds does not apply here
    search = ExportSearchSpec(prompt_tokens=list(opts.prompt_lens), new_tokens=opts.new_tokens)
    control = rounds.get(tuning.row_name(tuning.CONTROL))  # the shipped bundle again: pairs with `spec`
    record = choose(variants, {v.name: rounds[search_row(v.name)] for v in variants}, search,
                    control=(control, rounds[search_row(SPEC_VARIANT)]) if control else None)
    record["machine"] = timing_context()
    record["gates"] = {k: f"<= {bound}" for k, bound in BENCH_GATES.items()}
    record["accuracy_proxies"] = proxies
    return record


def _cost(with_: list[dict[str, Any]], without: list[dict[str, Any]], length: str) -> dict[str, Any]:
    """1 - decode tokens/s with the adapter / without, per round."""
    return summary([1 - x[length]["decode_tok_s"] / y[length]["decode_tok_s"] for x, y in zip(with_, without)
                    if length in x and length in y and y[length].get("decode_tok_s")])


def bench_peer(opts: "BenchOptions", say: Callable[[str], None]) -> dict[str, Any]:
    """The whole peer section: build, convert, interleaved rounds, sizes and ratios."""
    from phi_pipeline.bench import tuning
    from phi_pipeline.bench.decode import TORCH_PRECISION
    from phi_pipeline.bench.models import (
        SIZES,
        build_bench_base,
        export_bundle,
        make_random_adapter,
        merged_bundle,
    )
    from phi_pipeline.bench.options import ADAPTER_RANKS, TABLE_ADAPTER

    if opts.device != "cpu":
        return {"skipped": "the llama.cpp peer runs on CPU only"}
    version = pinned_version(opts.project_root)
    peer = build(opts.work_dir, version, say)
    work = opts.work_dir / opts.size
    # The same base, adapters and int4 bundle as the benchmark-model section (reused from its stamps).
    arch = SIZES[opts.size]
    base = build_bench_base(work / "base", arch, opts.bundle, dtype=TORCH_PRECISION["cpu"])
    peft = {n: make_random_adapter(base, work / "adapters" / n, r=r, seed=r, target_modules=arch.target_modules)
            for n, r in ADAPTER_RANKS.items()}
    bundle = export_bundle(base, peft, ADAPTER_RANKS, "int4", work / "int4", "cpu").bundle
    adapter = bundle / "adapters" / f"{TABLE_ADAPTER}.onnx_adapter"
    models = convert(peer, base, peft[TABLE_ADAPTER] / "adapter", work / "llama.cpp", say)

    def tuned_export(v: tuning.Variant) -> Path:
        say(f"exporting the variant tried: {v.name}")
        return export_bundle(base, peft, ADAPTER_RANKS, "int4", work / "tried" / tuning.slug(v), "cpu", v.export).bundle

    def merged() -> Path:
        say("exporting the merged variant (no LoRA inputs)")
        return merged_bundle(base, peft[TABLE_ADAPTER] / "adapter", ADAPTER_RANKS[TABLE_ADAPTER], "int4", work / "merged-int4")

    tuned = tuning.prepare(bundle, tuned_export, merged)
    candidates = {c.name: export_bundle(base, peft, ADAPTER_RANKS, "int4", work / "search" / c.name, "cpu", c.changes).bundle
                  for c in search_candidates()}
    reference = export_bundle(base, peft, ADAPTER_RANKS, "fp32", work / "fp32", "cpu").bundle
    say("export search: accuracy proxies of each variant against the fp32 export")
    proxies = {name: compare(reference, b, threads=opts.threads)
               for name, b in {SPEC_VARIANT: bundle, **candidates}.items()}
    scratch = work / "peer-runs"
    scratch.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for n in opts.prompt_lens:
        prompts[n] = scratch / f"prompt-{n}.txt"
        prompts[n].write_text(prompt_text(work / "llama.cpp" / "hf", n))

    def completion(name: str, i: int, lora: Path | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, f in prompts.items():
            t = llama_completion(peer, models.gguf[LORA_QUANT], f, opts, scratch / f"{name}-{i}-{n}.log", lora)
            out[str(n)] = t
        return out

    runners: dict[str, Callable[[int], dict[str, Any]]] = {
        "bundle int4": lambda i: _bundle_round(bundle, None, opts, scratch, f"peer-bundle-{i}"),
        "bundle int4 + r8": lambda i: _bundle_round(bundle, adapter, opts, scratch, f"peer-bundle-r8-{i}"),
        "llama.cpp Q4_0": lambda i: llama_bench(peer, models.gguf["Q4_0"], opts, scratch / f"bench-Q4_0-{i}.log"),
        "llama.cpp Q4_K_M": lambda i: llama_bench(peer, models.gguf["Q4_K_M"], opts, scratch / f"bench-Q4_K_M-{i}.log"),
        "llama.cpp Q4_0 (llama-completion)": lambda i: completion("completion", i, None),
        "llama.cpp Q4_0 + r8 (llama-completion)": lambda i: completion("completion-r8", i, models.lora),
    }
    for t in tuned:
        runners[tuning.row_name(t.variant)] = lambda i, t=t: _bundle_round(
            t.model, None, opts, scratch, f"peer-{tuning.slug(t.variant)}-{i}", t.session_options)
    for name, b in candidates.items():
        runners[search_row(name)] = lambda i, name=name, b=b: _bundle_round(b, None, opts, scratch, f"peer-search-{name}-{i}")
    rounds = measure_rounds(list(runners), lambda name, i: runners[name](i), opts.peer_rounds, say,
                            {tuning.row_name(t.variant): t.variant.rounds for t in tuned if t.variant.rounds})
    bundles = {SPEC_VARIANT: bundle, **candidates}
    model_sizes = {n: tree_size(b, exclude=(ADAPTERS_DIR,)) for n, b in bundles.items()}
    record = export_search(proxies, rounds, model_sizes, opts)
    shipped = record["winner"] or SPEC_VARIANT
    sizes = {"bundle_int4": model_sizes[shipped], "onnx_adapter_r8": adapter.stat().st_size,
             **{f"gguf_{q}": p.stat().st_size for q, p in models.gguf.items()}, "gguf_lora_r8": models.lora.stat().st_size}
    tuned_sizes = {t.variant.name: tree_size(t.model, exclude=(ADAPTERS_DIR,)) for t in tuned}
    genai = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"].get("session_options", {})
    return {
        "llama_cpp": {"llama-cpp-python sdist": version, "cmake_options": list(CMAKE_OPTIONS), "threads": opts.threads},
        "base": {"size": opts.size, "family": arch.family, "parameters": arch.parameters},
        "bundle": str(bundles[shipped]),
        "bundle_session_options": genai,
        "rounds": opts.peer_rounds,
        "sizes_bytes": sizes,
        "export_search": record,
        **summarize(rounds, sizes, opts.prompt_lens, shipped=search_row(shipped)),
        "tried": tuning.summarize(tuned, rounds, "bundle int4", "llama.cpp Q4_0", tuned_sizes, opts.prompt_lens),
        "raw_rounds": rounds,
    }
