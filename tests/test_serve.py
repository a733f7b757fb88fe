"""`phi-pipeline serve` against the real server (uvicorn on port 0, in this process) with the real
`openai` client, on a tiny random bundle: listing, chat and completions streamed and not for the
base model and each adapter, no cross-talk between concurrent mixed-adapter requests, every error
shape, API keys, disconnects, health, queueing and draining."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from phi_pipeline.serve.app import ServeSettings
from phi_pipeline.runtime.engine import Engine, EngineSettings, StopText
from serve_support import CHAT_ADAPTER, TEMPLATE_ADAPTER, client, pace, running

BASE = "bench-int4"  # the pipeline name export_bundle gives the random bundle
MODELS = [BASE, CHAT_ADAPTER, TEMPLATE_ADAPTER]
# both engines behind the same API: batched (the default here) and onnxruntime-genai's generators
ENGINES = ["batched", "genai"]


@pytest.fixture(scope="module", params=ENGINES)
def server(random_bundle, request):
    with running(ServeSettings(random_bundle, max_tokens=64, engine_kind=request.param)) as (url, srv):
        yield url, srv


@pytest.fixture(scope="module")
def oa(server):
    return client(server[0])


def _chat(oa, model, text, **kw):
    return oa.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], temperature=0, **kw)


def _chat_stream(oa, model, text, **kw):
    chunks = list(_chat(oa, model, text, stream=True, **kw))
    return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_models_list_base_and_each_adapter_with_parent(oa):
    listed = {m.id: m for m in oa.models.list().data}
    assert list(listed) == MODELS
    assert listed[BASE].model_extra["parent"] is None
    assert all(listed[a].model_extra["parent"] == BASE for a in (CHAT_ADAPTER, TEMPLATE_ADAPTER))
    assert oa.models.retrieve(CHAT_ADAPTER).id == CHAT_ADAPTER


@pytest.mark.parametrize("model", MODELS)
def test_chat_streamed_text_equals_whole_text_for_every_model(oa, model):
    whole = _chat(oa, model, "a b c", max_tokens=12)
    assert whole.object == "chat.completion" and whole.model == model
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks, streamed = _chat_stream(oa, model, "a b c", max_tokens=12, stream_options={"include_usage": True})
    assert streamed == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_completion_streamed_text_equals_whole_text_for_every_model(oa, model):
    whole = oa.completions.create(model=model, prompt="the cat", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    stream = list(oa.completions.create(model=model, prompt="the cat", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text
    assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in stream)  # usage only when stream_options asks


def test_adapters_change_the_answer(oa):
    answers = {m: oa.completions.create(model=m, prompt="the cat", max_tokens=10, temperature=0).choices[0].text
               for m in MODELS}
    assert len(set(answers.values())) == len(MODELS), answers


def test_max_tokens_reached_gives_finish_reason_length(oa):
    reply = oa.completions.create(model=BASE, prompt="hello", max_tokens=3, temperature=0, stop=None)
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 3
    else:  # the random model ended early with its end-of-text token
        assert reply.usage.completion_tokens < 3


def test_stop_string_cuts_the_answer_streamed_and_whole(oa):
    full = oa.completions.create(model=CHAT_ADAPTER, prompt="x y", max_tokens=24, temperature=0).choices[0].text
    assert len(full) > 4
    stop = full[3:5]
    cut = oa.completions.create(model=CHAT_ADAPTER, prompt="x y", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    stream = oa.completions.create(model=CHAT_ADAPTER, prompt="x y", max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == cut.choices[0].text


def test_template_adapter_chat_formats_the_last_user_message_with_its_template(oa, random_bundle):
    manifest = json.loads((random_bundle / "manifest.json").read_text())
    fmt = next(a["prompt_format"] for a in manifest["adapters"] if a["name"] == TEMPLATE_ADAPTER)
    # the chat endpoint with a template adapter == its template text sent as a raw completion
    text = f"{fmt['bos']} " + fmt["prefix"].format(input="b a")
    chat = oa.chat.completions.create(model=TEMPLATE_ADAPTER, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "ignored"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ignored"}, {"role": "user", "content": "b a"}])
    raw = oa.completions.create(model=TEMPLATE_ADAPTER, prompt=text, temperature=0, max_tokens=8)
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens


def test_seeded_sampling_repeats_and_differs_from_greedy(oa):
    def sample(seed):
        return oa.completions.create(model=BASE, prompt="a", max_tokens=16, temperature=1.5, seed=seed,
                                     extra_body={"top_k": 0}).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_concurrent_mixed_adapter_clients_get_their_solo_outputs(server, oa, monkeypatch):
    """8 clients at once, 3 models, chat and completions, streamed and not: each gets what it got alone."""
    pace(monkeypatch, 0.002)  # requests long enough to overlap however the client threads get scheduled
    jobs = [(MODELS[i % 3], f"{'abcdefgh'[i]} {'hgfedcba'[i]} c", i % 2 == 0, i % 4 < 2) for i in range(8)]

    def run(job):
        model, text, chat, stream = job
        if chat:
            if stream:
                return _chat_stream(oa, model, text, max_tokens=20)[1]
            return _chat(oa, model, text, max_tokens=20).choices[0].message.content
        reply = oa.completions.create(model=model, prompt=text, max_tokens=20, temperature=0, stream=stream)
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    solo = [run(j) for j in jobs]
    engine = server[1].engine
    engine.peak_active = 0
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, jobs))
    assert together == solo
    assert engine.peak_active > 1  # requests really were decoded side by side


def _raw(url, path, body=None, **kw):
    if isinstance(body, (dict, list)):
        kw["json"] = body
    elif body is not None:
        kw["content"] = body
        kw.setdefault("headers", {"Content-Type": "application/json"})
    return httpx.post(url + path, timeout=30, **kw)


def _error(resp, status):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_errors_come_in_openai_shape(server, oa):
    url = server[0]
    with pytest.raises(openai.NotFoundError) as exc:
        _chat(oa, "nope", "hi")
    assert exc.value.code == "model_not_found" and "`nope` does not exist" in exc.value.message

    msgs = [{"role": "user", "content": "hi"}]
    assert _error(_raw(url, "/v1/chat/completions", "{not json"), 400)["message"].startswith("the body is not valid JSON")
    bad = _error(_raw(url, "/v1/chat/completions", {"model": BASE, "messages": msgs, "temperature": 5}), 400)
    assert bad["param"] == "temperature"
    many = _error(_raw(url, "/v1/chat/completions", {"model": BASE, "messages": [], "top_p": 0}), 400)
    assert "messages" in many["message"] and "top_p" in many["message"]  # every problem at once
    unknown = _error(_raw(url, "/v1/completions", {"model": BASE, "prompt": "a", "colour": 1}), 400)
    assert unknown["param"] == "colour"
    for field, value in (("n", 2), ("tools", [{"type": "function"}]), ("logprobs", True)):
        e = _error(_raw(url, "/v1/chat/completions", {"model": BASE, "messages": msgs, field: value}), 400)
        assert e["param"] == field and "not supported" in e["message"]
    assert _raw(url, "/v1/chat/completions", {"model": BASE, "messages": msgs, "n": 1, "max_tokens": 2}).status_code == 200

    with pytest.raises(openai.BadRequestError) as exc:
        oa.completions.create(model=BASE, prompt="a " * 3000, max_tokens=4)
    assert exc.value.code == "context_length_exceeded" and "1024" in exc.value.message
    assert _error(_raw(url, "/v1/completions", {"model": BASE, "prompt": ""}), 400)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as exc:
        oa.completions.create(model=BASE, prompt="a", max_tokens=65)
    assert exc.value.param == "max_tokens"
    assert _error(_raw(url, "/v1/completions", json.dumps({"model": BASE, "prompt": "a" * (2 << 20)})), 413)
    assert _error(httpx.get(url + "/v1/nothing-here"), 404)
    for seed in (2**64, -(2**63) - 1):  # wider than OpenAI's 64-bit seed: a 400 naming it, not a 500
        assert _error(_raw(url, "/v1/completions", {"model": BASE, "prompt": "a", "seed": seed}), 400)["param"] == "seed"
    assert httpx.get(url + "/openapi.json").status_code == 200  # no key: the API docs are served


def test_any_64_bit_seed_samples_and_repeats(oa):
    def sample(seed):
        return oa.completions.create(model=BASE, prompt="a b", max_tokens=6, temperature=1, seed=seed).choices[0].text

    for seed in (2**63 - 1, -(2**63), 2**31, -1):
        assert sample(seed) == sample(seed), seed


def test_engine_failure_is_500_and_ends_a_stream_with_an_error_event(server, oa, monkeypatch):
    from phi_pipeline.runtime import genai as runtime
    from phi_pipeline.runtime.batched import BatchedDecoder

    real = runtime.Generation.step

    def failing(self):
        if len(self.new_tokens) == 2:
            raise RuntimeError("boom")
        return real(self)

    def failing_step(self, *args):  # a decode step: every request had its first token from the prompt
        raise RuntimeError("boom")

    monkeypatch.setattr(runtime.Generation, "step", failing)
    monkeypatch.setattr(BatchedDecoder, "decode", failing_step)
    with pytest.raises(openai.InternalServerError) as exc:
        oa.completions.create(model=BASE, prompt="a b", max_tokens=8, temperature=0)
    assert "boom" in exc.value.message
    stream = oa.completions.create(model=BASE, prompt="a b", max_tokens=8, temperature=0, stream=True)
    with pytest.raises(openai.APIError, match="boom"):
        list(stream)
    monkeypatch.undo()
    assert oa.completions.create(model=BASE, prompt="a b", max_tokens=2, temperature=0).choices[0].text


def test_api_key_required_when_set(random_bundle):
    with running(ServeSettings(random_bundle, api_key="s3cret")) as (url, _):
        for key in ("none", "s3cre", "s3cret-and-more"):
            with pytest.raises(openai.AuthenticationError) as exc:
                client(url, key).models.list()
            assert exc.value.code == "invalid_api_key"
        assert _error(httpx.get(url + "/v1/models"), 401)
        assert [m.id for m in client(url, "s3cret").models.list().data] == MODELS
        assert httpx.get(url + "/health").status_code == 200  # health and the page stay open
        for docs in ("/docs", "/redoc", "/openapi.json"):  # the generated API docs are not served with a key
            assert httpx.get(url + docs).status_code == 404, docs
            assert httpx.get(url + docs, headers={"Authorization": "Bearer s3cret"}).status_code == 404, docs


@pytest.mark.parametrize("kind", ENGINES)
def test_disconnect_mid_stream_frees_the_slot(random_bundle, kind):
    settings = ServeSettings(random_bundle, max_tokens=1000, engine=EngineSettings(max_active=1, max_queue=0),
                             engine_kind=kind)
    with running(settings) as (url, srv):
        body = {"model": BASE, "prompt": "a", "max_tokens": 1000, "min_tokens": 1000, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())  # one event in, then the client goes away
        deadline = time.monotonic() + 10
        while srv.engine.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.engine.busy == 0
        assert client(url).completions.create(model=BASE, prompt="a", max_tokens=2).choices[0].text


@pytest.mark.parametrize("kind", ENGINES)
def test_queue_full_gets_429_with_retry_after(random_bundle, monkeypatch, kind):
    settings = ServeSettings(random_bundle, max_tokens=1000, engine=EngineSettings(max_active=1, max_queue=1),
                             engine_kind=kind)
    pace(monkeypatch, 0.01)  # the first request still decodes when the third comes (the tiny model is quick)
    with running(settings) as (url, _):
        oa = client(url)
        # one request decoding, one waiting: the queue is full
        streams = [oa.completions.create(model=BASE, prompt="a", max_tokens=1000, stream=True,
                                         extra_body={"min_tokens": 1000}) for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as exc:
            oa.completions.create(model=BASE, prompt="a", max_tokens=2)
        assert exc.value.response.headers["Retry-After"] == "1" and exc.value.code == "queue_full"
        for s in streams:
            s.close()


@pytest.mark.parametrize("kind", ENGINES)
def test_drain_finishes_running_requests_and_refuses_new_ones(random_bundle, monkeypatch, kind):
    pace(monkeypatch, 0.005)  # a model slow enough that the stream is still running when the signal comes
    with running(ServeSettings(random_bundle, max_tokens=400, engine_kind=kind)) as (url, srv):
        oa = client(url)
        kw = dict(model=CHAT_ADAPTER, prompt="a", max_tokens=400, temperature=0, extra_body={"min_tokens": 400})
        alone = oa.completions.create(**kw).choices[0].text
        stream = oa.completions.create(stream=True, **kw)
        chunks = iter(stream)
        first = next(chunks)
        srv.handle_exit(signal.SIGTERM, None)  # what Ctrl-C / SIGTERM calls
        assert httpx.get(url + "/health").json()["status"] == "draining"
        with pytest.raises(openai.InternalServerError) as exc:
            oa.completions.create(model=BASE, prompt="a", max_tokens=2)
        assert exc.value.status_code == 503 and exc.value.code == "draining"
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        assert first.choices[0].text + "".join(c.choices[0].text for c in rest) == alone
        deadline = time.monotonic() + 20
        while not srv.should_exit and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.should_exit  # and the server goes once nothing is left


def test_health_is_503_while_loading_then_200(random_bundle):
    from phi_pipeline.runtime.genai import BundleModel

    release = threading.Event()

    def slow_load():
        release.wait(60)
        return BundleModel(random_bundle)

    settings = ServeSettings(random_bundle)
    with running(settings, wait_ready=False, engine=Engine(slow_load)) as (url, srv):
        assert httpx.get(url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as exc:
            client(url).completions.create(model=BASE, prompt="a", max_tokens=2)
        assert exc.value.status_code == 503 and exc.value.code == "loading"
        assert [m.id for m in client(url).models.list().data] == MODELS  # listing needs no model
        release.set()
        assert srv.engine.ready.wait(60)
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_health_answers_promptly_while_streams_run(server, oa):
    streams = [oa.completions.create(model=m, prompt="a", max_tokens=60, temperature=0, stream=True) for m in MODELS]
    for s in streams:
        next(iter(s))
    start = time.monotonic()
    assert httpx.get(server[0] + "/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 2
    for s in streams:
        assert list(s)[-1].choices[0].finish_reason


def test_serving_bench_reports_every_level_of_every_engine_over_rounds_and_the_mixing_cost(random_bundle, tmp_path):
    from phi_pipeline.bench.serving import bench_serving, report_lines

    result = bench_serving(random_bundle, tmp_path, threads=None, prompt_len=8, new_tokens=4, concurrency=(1, 2),
                           rounds=2)
    assert list(result["engines"]) == ENGINES and result["models"] == MODELS
    for engine in result["engines"].values():
        assert list(engine["mixed"]) == ["1", "2"] and list(engine["one_model"]) == MODELS
        for level in [*engine["mixed"].values(), *engine["one_model"].values()]:
            assert level["failed"] == 0 and level["requests"] == 4
            assert level["output_tokens"] == 4 * level["requests"]  # min_tokens: exactly new_tokens each
            assert level["output_tok_s"] == pytest.approx(level["output_tokens"] / level["wall_s"], rel=0.05)
            assert 0 < level["ttft_s"]["p50"] <= level["latency_s"]["p50"] and level["latency_s"]["p95"] > 0
        for level in engine["mixed"].values():  # the median round, with both rounds' spread
            rounds = level["output_tok_s_rounds"]
            assert rounds["n"] == 2 and rounds["min"] <= level["output_tok_s"] <= rounds["max"]
        assert engine["speedup_vs_sequential"]["1"]["median"] == 1.0 and engine["speedup_vs_sequential"]["2"]["n"] == 2
        assert isinstance(engine["mixing_cost"], float)
        # every level resends the same prompts: no server keeps them (batching is measured, not the cache)
        assert engine["prefix_cache"] is None
    assert all(4 <= n <= 12 for n in result["prompt_tokens"])
    report = "\n".join(report_lines(result))
    assert "No prompt cache on any server" in report
    assert "| batched | mixed, 2 | 4 |" in report and f"| genai | {CHAT_ADAPTER} only, 2 |" in report
    assert "Cost of mixing (batched)" in report and "2 round(s) per engine" in report


@pytest.mark.parametrize("kind", ENGINES)
def test_long_prompt_goes_in_chunks_and_a_short_request_is_not_stuck_behind_a_long_one(random_bundle, monkeypatch, kind):
    from phi_pipeline.runtime import genai as runtime
    from phi_pipeline.runtime.batched import BatchedDecoder

    feeds = []  # prompt tokens of each model run that fed a prompt
    real_feed, real_prefill = runtime.Generation.feed, BatchedDecoder.prefill

    def counted(self, chunk=None):
        before = self.fed
        done = real_feed(self, chunk)
        feeds.append(self.fed - before)
        return done

    def counted_prefill(self, ids, start, adapter, row):
        feeds.append(len(ids))
        return real_prefill(self, ids, start, adapter, row)

    monkeypatch.setattr(runtime.Generation, "feed", counted)
    monkeypatch.setattr(BatchedDecoder, "prefill", counted_prefill)
    pace(monkeypatch, 0.002)
    settings = ServeSettings(random_bundle, max_tokens=1000, engine=EngineSettings(prefill_chunk=16), engine_kind=kind)
    with running(settings) as (url, srv):
        oa = client(url)
        prompt = " ".join("abcdefgh"[i % 8] for i in range(300))
        whole = oa.completions.create(model=TEMPLATE_ADAPTER, prompt=prompt, max_tokens=8, temperature=0)
        n = whole.usage.prompt_tokens
        assert len(feeds) == -(-n // 16) and sum(feeds) == n and max(feeds) == 16  # ceil(n / 16) runs for the prompt

        long = oa.completions.create(model=BASE, prompt="a", max_tokens=1000, temperature=0, stream=True,
                                     extra_body={"min_tokens": 1000})
        chunks = iter(long)
        next(chunks)
        short = oa.completions.create(model=CHAT_ADAPTER, prompt="b", max_tokens=2, temperature=0, extra_body={"min_tokens": 2})
        assert short.usage.completion_tokens == 2
        assert srv.engine.busy == 1  # the long one is still decoding
        assert sum(1 for _ in chunks) > 100
        # the short request joined the long one's batch and got what it gets alone
        alone = oa.completions.create(model=CHAT_ADAPTER, prompt="b", max_tokens=2, temperature=0, extra_body={"min_tokens": 2})
        assert short.choices[0].text == alone.choices[0].text
    # chunked prefill gives the answer one model run over the whole prompt gives
    with running(ServeSettings(random_bundle, max_tokens=8, engine_kind=kind)) as (url, _):
        again = client(url).completions.create(model=TEMPLATE_ADAPTER, prompt=prompt, max_tokens=8, temperature=0)
    assert again.choices[0].text == whole.choices[0].text


def test_health_reports_a_failed_load(random_bundle):
    def broken():
        raise RuntimeError("no such model")

    with running(ServeSettings(random_bundle), wait_ready=False, engine=Engine(broken)) as (url, srv):
        assert srv.engine.ready.wait(30)
        resp = httpx.get(url + "/health")
        assert resp.status_code == 503 and resp.json() == {"status": "failed", "error": "RuntimeError: no such model"}


def test_stop_text_holds_back_what_could_start_a_stop_string():
    text = StopText(("END", "xy"))
    assert text.add("abc") == "a"  # "bc" could be the start of "END": held back
    assert text.add("E") == "b"
    assert text.add("N") == "c"
    assert text.add("Dzz") == "" and text.stopped and text.text == "abc"  # cut where END starts
    plain = StopText(())
    assert plain.add("abc") == "abc" and plain.flush() == ""
    late = StopText(("xy",))
    assert late.add("ax") == "a" and late.flush() == "x"  # the end of the answer releases what was held


def test_sampling_options_follow_openai_semantics():
    from phi_pipeline.runtime.genai import Sampling

    assert Sampling().search_options() == {}
    assert Sampling(temperature=0, seed=3).search_options() == {"do_sample": False}
    assert Sampling(temperature=0.7).search_options() == {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}
    assert Sampling(top_p=0.9, seed=1).search_options() == {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                             "top_p": 0.9, "random_seed": 1}
    wide = (2**31, 2**63 - 1, -(2**63), 2**32 + 2**31, -1, -5)
    folded = [Sampling(temperature=1, seed=s).search_options()["random_seed"] for s in wide]
    assert all(0 <= s < 2**31 for s in folded) and len(set(folded)) == len(wide)  # genai's range, still distinct
    assert Sampling(temperature=1, seed=5).search_options()["random_seed"] == 5  # seeds in its range are kept


def test_serve_cli_refuses_bad_arguments_with_exit_code_2(tmp_path, capsys):
    from phi_pipeline.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-active", "0", "--max-queue", "-1", "--prefill-min-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-active must be >= 1" in err and "--max-queue must be >= 0" in err
    assert "--prefill-min-tokens must be between 1 and 128" in err


def test_serving_bench_view_names_every_id_of_the_vocabulary(tmp_path):
    from phi_pipeline.bench.serving import every_id_spoken

    bundle = tmp_path / "bundle"
    (bundle / "adapters").mkdir(parents=True)
    (bundle / "genai_config.json").write_text(json.dumps({"model": {"vocab_size": 6}}))
    (bundle / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 1, "b": 2}},
                                                       "added_tokens": [{"id": 0, "content": "<|endoftext|>"}]}))
    view = every_id_spoken(bundle, tmp_path / "view")
    added = json.loads((view / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["id"], t["content"], t["special"]) for t in added[1:]] == [(3, " t3", False), (4, " t4", False), (5, " t5", False)]
    assert (view / "adapters").resolve() == (bundle / "adapters").resolve() and (view / "genai_config.json").is_symlink()
    assert json.loads((bundle / "tokenizer.json").read_text())["added_tokens"] == added[:1]  # the bundle is untouched


def test_client_leaving_a_running_batch_frees_its_row_and_the_others_keep_their_answers(random_bundle, monkeypatch):
    pace(monkeypatch, 0.003)
    settings = ServeSettings(random_bundle, max_tokens=40, engine=EngineSettings(max_active=3, max_queue=0))
    with running(settings) as (url, srv):
        oa = client(url)
        kw = dict(prompt="a b", max_tokens=40, temperature=0, extra_body={"min_tokens": 40})
        solo = {m: oa.completions.create(model=m, **kw).choices[0].text for m in MODELS}
        streams = {m: iter(oa.completions.create(model=m, stream=True, **kw)) for m in MODELS}
        firsts = {m: next(s).choices[0].text for m, s in streams.items()}
        assert srv.engine.busy == 3
        streams.pop(BASE).close()  # the first row leaves mid-batch: the last one moves into its place
        deadline = time.monotonic() + 10
        while srv.engine.busy > 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert srv.engine.busy <= 2
        for m, s in streams.items():
            assert firsts[m] + "".join(c.choices[0].text for c in s) == solo[m], m
        # its row is free again: a fourth request is decoded, not refused
        assert oa.completions.create(model=BASE, prompt="a", max_tokens=2).usage.completion_tokens


def test_batched_step_times_and_profile_cover_each_batch_size(random_bundle):
    from phi_pipeline.bench.serving import step_times

    result = step_times(random_bundle, batches=(1, 2), prompt_len=8, steps=3, rounds=2)
    assert result["prefill_ms"]["n"] == 4 and result["prefill_ms"]["min"] > 0
    for b in ("1", "2"):
        assert result["decode_step_ms"][b]["n"] == 2 and result["decode_step_ms"][b]["min"] > 0
        profile = result["profile"][b]
        assert profile["decode_steps"] == 3 and "MatMulNBits" in profile["by_op"]
        assert any(g.startswith("LoRA") for g in profile["by_op"])
