"""Serving (issue 12): `lorakit serve` under load, against one-request-at-a-time PEFT, on loopback.

    python benchmarks/bench_serve.py [--requests 64] [--rate 50] [--adapters 1,4,16,64]
                                     [--popularity uniform,zipf] [--baseline-adapters 16] [--passes 1]
                                     [--targets qv|all-linear] [--rank 8] [--max-batch 64]
                                     [--sections step,prefill,http] [--wait-quiet SECONDS] [--quick] [--json PATH]

Model: the embedded SmolLM2-135M-Instruct (float32, CPU; ``--quick``: a 2-layer Llama from a config with
a 512-word tokenizer, random weights). Adapters: LoRA r=8, alpha 16, on q_proj and v_proj (``--targets
all-linear``: every linear layer), A as ``lk.adapt`` initialises it and B random (std 0.05), both from fixed
seeds, so that every adapter changes the answers; made once with ``lk.adapt`` + ``lk.save`` into a temporary
directory; a configuration with N adapters serves the first N of them.

Workload (S-LoRA's setup scaled down, fixed seeds): ``--requests`` requests with Poisson arrivals at
``--rate`` requests/s (the default saturates both servers), prompt lengths uniform in [8, 64] tokens (random
token ids, sent as a token-id list), output lengths uniform in [8, 32] (``max_tokens``), temperature 0, and
the adapter of each request drawn uniformly or by a power law (Zipf, alpha 1: adapter k has weight 1/k) over
the served adapters (one adapter: one run, both draws are the same). Prompts, lengths and arrival times are
the same in every configuration; only the adapters differ. Every request streams
(``stream_options.include_usage``); a request may end before ``max_tokens`` at EOS, and throughput counts the
completion tokens its ``usage`` reports. The load comes from a process of its own (httpx.AsyncClient), so
the client's parsing does not take the servers' GIL; it times every request with its own clock.

  1. http: every configuration gets a fresh ``Server`` (max batch ``--max-batch``, every adapter loaded:
     ``max_loaded_adapters`` = N) on a fresh copy of the model, served by uvicorn on 127.0.0.1; with
     ``--passes`` > 1 every configuration runs once per pass, the order reversed every other pass. The
     baseline, "what users have today", runs once, after the middle pass, for the counts in
     ``--baseline-adapters`` and the draws in ``--baseline-popularity``: a FastAPI + uvicorn server (defined
     here, not in the library) holding a PeftModel with every adapter (``PeftModel.from_pretrained`` +
     ``load_adapter`` of our saved files) that serves one request at a time (an asyncio.Lock around the whole
     generation), calls ``set_adapter`` per request and generates with HF ``model.generate`` (greedy,
     ``max_new_tokens``), streaming each token as ``generate`` produces it (a ``BaseStreamer`` feeding the
     SSE response). Both get a short warm-up first. Reported: requests/s and output tokens/s over the
     makespan (first send to last answer), p50/p99 time to first token (send to the first chunk with text),
     p50/p99 per-token latency ((last text chunk - first) / (completion tokens - 1), per request), the
     engine's decode steps, rows per step and share of the makespan spent prefilling, and how many answers
     are identical between ours and the baseline (same requests, greedy).
  2. step: one decode step of a full batch (``--step-batch`` rows, prompts drawn as above) on the engine
     itself, ``Engine._decode`` (routing, slab, forward, token choice, text), round-robin: a plain copy of the
     model (no adapters), the mixed batch over ``--step-adapters`` adapters, every row on one adapter, every
     row on the base, and (for the "64 against 1" target) a model with only 1 adapter loaded against one
     with the largest ``--adapters`` count loaded and a different adapter per row. Also the forward alone.
  3. prefill: ``--step-batch`` prompts into an engine's slab, one request per forward against the engine's own
     admission of them all (``Engine._admit``), and one left-padded routed forward for reference.

The sections run in the order step, prefill, http.

Targets: at 16 adapters our output tokens/s >= 8x the baseline's; tokens/s at 64 adapters >= 0.9x at 1
adapter (each popularity; on the engine: decode steps/s with 64 loaded >= 0.9x with 1); a mixed decode step
(``--step-batch`` rows over ``--step-adapters``) <= 1.35x the plain model's step of the same batch.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import gc
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


# --- the load generator (the --client process imports nothing past this section) ------------------------
@dataclasses.dataclass
class Request:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    adapter: int  # index into the served adapters


def workload(args, vocab: int, adapters: int, popularity: str) -> list[Request]:
    """The same prompts, lengths and arrivals for every configuration; adapters drawn per ``popularity``."""
    rng, pick = random.Random(args.seed), random.Random(args.seed + 1)
    weights = [1.0 / (k + 1) ** args.zipf_alpha for k in range(adapters)] if popularity == "zipf" else None
    out, t = [], 0.0
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        prompt = [rng.randrange(FIRST_TOKEN, vocab) for _ in range(rng.randint(*PROMPT_LEN))]
        max_tokens = rng.randint(*OUTPUT_LEN)
        adapter = pick.choices(range(adapters), weights)[0] if weights else pick.randrange(adapters)
        out.append(Request(t, prompt, max_tokens, adapter))
    return out


# --- the load generator ---------------------------------------------------------------------------
async def _one(client, url: str, request: Request, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + request.arrival - time.perf_counter()))
    body = {"model": f"a{request.adapter}", "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    usage, texts = None, []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                    texts.append(choice["text"])
    done = time.perf_counter()
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    tokens = usage["completion_tokens"]
    return {"sent": sent, "done": done, "ttft": (first if first is not None else done) - sent,
            "tpot": (last - first) / (tokens - 1) if tokens >= 2 and first is not None else None,
            "tokens": tokens, "text": "".join(texts)}


async def _drive(url: str, requests: list[Request]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(_one(client, url, r, t0) for r in requests))


def drive_here(url: str, requests: list[Request]) -> list[dict]:
    return asyncio.run(_drive(url, requests))


def drive(url: str, requests: list[Request]) -> list[dict]:
    """The timed load: sent from a process of its own, so that the client's parsing does not hold the
    servers' GIL (a real client is another process); its own perf_counter times every request."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-client-") as tmp:
        work, out = Path(tmp) / "requests.json", Path(tmp) / "results.json"
        work.write_text(json.dumps([dataclasses.asdict(r) for r in requests]))
        subprocess.run([sys.executable, __file__, "--client", url, str(work), str(out)], check=True)
        return json.loads(out.read_text())


def client_main(url: str, work: str, out: str) -> None:
    requests = [Request(**r) for r in json.loads(Path(work).read_text())]
    Path(out).write_text(json.dumps(drive_here(url, requests)))



if __name__ == "__main__" and sys.argv[1:2] == ["--client"]:
    client_main(*sys.argv[2:5])
    sys.exit(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402
# module level: FastAPI resolves the baseline endpoint's annotation (a string, see __future__) here
from fastapi import Request as HTTPRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from bench_core import ForeignLoad, wait_quiet  # noqa: E402

import lorakit as lk  # noqa: E402

TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}
PROMPT_LEN, OUTPUT_LEN = (8, 64), (8, 32)
FIRST_TOKEN = 100  # prompt token ids are drawn from [FIRST_TOKEN, vocab): no special tokens
B_STD = 0.05


# --- model and adapters ---------------------------------------------------------------------------
def tiny_model(directory: Path):
    """A 2-layer Llama with a 512-word tokenizer (random weights): the --quick model."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<bos>": 1, **{f"w{i}": i for i in range(2, 512)}}
    backend = Tokenizer(tmodels.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>",
                                        pad_token="<eos>", unk_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         eos_token_id=0, bos_token_id=1, pad_token_id=0, tie_word_embeddings=True))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    from lorakit.train import models
    return models.load(str(directory), log=lambda m: None)


def load_model(args, tmp: Path):
    """(model, tokenizer, name): frozen and in eval mode; every server gets a deep copy."""
    if args.quick:
        model, tokenizer = tiny_model(tmp / "tiny-model")
        name = "tiny-llama (2 layers, hidden 64, vocab 512, random weights)"
    else:
        from lorakit.train import models
        model, tokenizer = models.load(None, log=lambda m: print(m, file=sys.stderr))
        name = "SmolLM2-135M-Instruct"
    return model.eval().requires_grad_(False), tokenizer, name


def make_adapters(model, count: int, args, root: Path) -> list[Path]:
    """``count`` LoRA adapters saved with lk.save, each with its own random B (A as lk.adapt initialises it, from
    a fixed seed)."""
    maker = copy.deepcopy(model)
    torch.manual_seed(args.seed + 100)
    generator = torch.Generator().manual_seed(args.seed + 101)
    dirs = []
    for i in range(count):
        name = f"a{i}"
        lk.adapt(maker, lk.LoRA(rank=args.rank, alpha=2 * args.rank), TARGETS[args.targets], name=name)
        with torch.no_grad():
            for path, p in maker.named_parameters():
                if f".adapters.{name}." in path and "lora_B" in path:
                    p.copy_(torch.randn(p.shape, generator=generator) * B_STD)
        dirs.append(lk.save(maker, root / name, name=name))
        lk.delete(maker, name)
    del maker
    return dirs


def check_adapters_differ(model, dirs: list[Path], tokenizer) -> float:
    """The smallest max |Δlogit| between the base and each of the first adapters on one prompt (must be > 0)."""
    probe = copy.deepcopy(model)
    ids = torch.tensor([list(range(FIRST_TOKEN, FIRST_TOKEN + 16))])
    with torch.no_grad():
        base = probe(input_ids=ids).logits
        changes = []
        for i, d in enumerate(dirs[:4]):
            lk.load(probe, d, name=f"p{i}")
            with lk.route(probe, [f"p{i}"]):
                changes.append((probe(input_ids=ids).logits - base).abs().max().item())
    del probe
    assert min(changes) > 1e-3, f"an adapter does not change the logits: {changes}"
    return min(changes)


# --- workload -------------------------------------------------------------------------------------
def warm_up(url: str, adapters: int, count: int) -> None:
    """A few short requests over distinct adapters (first forwards, routing stacks, connections)."""
    drive_here(url, [Request(0.0, list(range(FIRST_TOKEN, FIRST_TOKEN + 12 + i)), 4, i % adapters)
                for i in range(count)])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def summarise(results: list[dict]) -> dict:
    start, end = min(r["sent"] for r in results), max(r["done"] for r in results)
    makespan = end - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    return {"makespan_s": makespan, "requests": len(results), "completion_tokens": tokens,
            "req_s": len(results) / makespan, "tok_s": tokens / makespan,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99),
            "latency_p50_ms": 1e3 * percentile([r["done"] - r["sent"] for r in results], 50)}


# --- serving: ours and the baseline -------------------------------------------------------------------
class EngineClock:
    """Time spent in the engine's prefills and decode steps, and the rows per step (wrapping the engine's
    methods on this instance only)."""

    def __init__(self, engine):
        self.reset()
        prefill, decode = engine._prefill, engine._decode

        def timed_prefill(rows):
            start = time.perf_counter()
            prefill(rows)
            self.prefill_s += time.perf_counter() - start
            size = sum(len(row) for row in rows)
            self.prefills += size
            self.prefill_forwards += 1
            self.group_sizes[size] = self.group_sizes.get(size, 0) + 1

        def timed_decode():
            rows, start = len(engine.running), time.perf_counter()
            decode()
            self.decode_s += time.perf_counter() - start
            self.steps += 1
            self.rows += rows

        engine._prefill, engine._decode = timed_prefill, timed_decode

    def reset(self) -> None:
        self.prefill_s = self.decode_s = 0.0
        self.prefills = self.prefill_forwards = self.steps = self.rows = 0
        self.group_sizes: dict[int, int] = {}  # requests per prefill forward: how many forwards


def run_ours(model, tokenizer, dirs: list[Path], requests: list[Request], args) -> tuple[dict, list[dict]]:
    from lorakit.serve.app import Server, running

    served = {f"a{i}": d for i, d in enumerate(dirs)}
    server = Server(copy.deepcopy(model), tokenizer, "base", served, max_batch=args.max_batch,
                    max_loaded_adapters=len(dirs), max_queue=max(256, 2 * len(requests)))
    clock = EngineClock(server.engine)
    with running(server) as url:
        warm_up(url, len(dirs), args.warmup_requests)
        wait_quiet(args.wait_quiet)
        clock.reset()
        with ForeignLoad() as load:
            results = drive(url, requests)
        loads = server.store.loads
    # FastAPI's module-level caches keep the app's endpoint functions, and through them the Server, alive:
    # empty it so that its model copy is freed
    server.__dict__.clear()
    del server
    gc.collect()
    summary = summarise(results)
    summary.update(other_cores=load.cores, adapter_loads=loads, decode_steps=clock.steps,
                   rows_per_step=clock.rows / max(clock.steps, 1), prefill_s=clock.prefill_s,
                   decode_s=clock.decode_s, prefill_ms_each=1e3 * clock.prefill_s / max(clock.prefills, 1),
                   prefill_forwards=clock.prefill_forwards, prefill_group_sizes=dict(sorted(clock.group_sizes.items())),
                   decode_ms_each=1e3 * clock.decode_s / max(clock.steps, 1),
                   prefill_share=clock.prefill_s / summary["makespan_s"])
    return summary, results


def run_engine_only(model, tokenizer, dirs: list[Path], requests: list[Request], args) -> tuple[dict, list[dict]]:
    """The same requests handed straight to a running Engine (no HTTP, no client process): what the HTTP
    layer and the client cost, by difference."""
    from lorakit.serve.engine import Engine, Generation, Sampling

    gc.collect()  # the previous run's model copy, held in reference cycles
    served = copy.deepcopy(model)
    engine = Engine(served, tokenizer, _loaded(served, dirs), max_batch=args.max_batch,
                    max_queue=max(256, 2 * len(requests)))
    clock = EngineClock(engine)
    engine.start()

    def run(batch: list[Request]) -> list[dict]:
        records = [{"first": None, "last": None, "texts": []} for _ in batch]
        finished = threading.Semaphore(0)

        def sink_for(record):
            def sink(event):
                now = time.perf_counter()
                if event.get("text"):
                    record["first"] = now if record["first"] is None else record["first"]
                    record["last"] = now
                    record["texts"].append(event["text"])
                elif "done" in event or "error" in event:
                    record.update(done=now, tokens=event.get("completion_tokens", 0), error=event.get("error"))
                    finished.release()
            return sink

        t0 = time.perf_counter()
        for r, record in zip(batch, records):
            time.sleep(max(0.0, t0 + r.arrival - time.perf_counter()))
            record["sent"] = time.perf_counter()
            engine.submit([Generation(r.prompt, f"a{r.adapter}", Sampling(max_tokens=r.max_tokens), sink_for(record))])
        for _ in batch:
            finished.acquire()
        errors = [rec["error"] for rec in records if rec.get("error")]
        assert not errors, errors[:1]
        return [{"sent": rec["sent"], "done": rec["done"], "tokens": rec["tokens"], "text": "".join(rec["texts"]),
                 "ttft": (rec["first"] if rec["first"] is not None else rec["done"]) - rec["sent"],
                 "tpot": (rec["last"] - rec["first"]) / (rec["tokens"] - 1)
                 if rec["tokens"] >= 2 and rec["first"] is not None else None} for rec in records]

    try:
        run([Request(0.0, list(range(FIRST_TOKEN, FIRST_TOKEN + 12 + i)), 4, i % len(dirs))
             for i in range(args.warmup_requests)])
        wait_quiet(args.wait_quiet)
        clock.reset()
        with ForeignLoad() as load:
            results = run(requests)
    finally:
        engine.stop()
    summary = summarise(results)
    summary.update(other_cores=load.cores, decode_steps=clock.steps, rows_per_step=clock.rows / max(clock.steps, 1),
                   prefill_s=clock.prefill_s, decode_s=clock.decode_s, prefill_forwards=clock.prefill_forwards,
                   prefill_group_sizes=dict(sorted(clock.group_sizes.items())),
                   prefill_ms_each=1e3 * clock.prefill_s / max(clock.prefills, 1),
                   decode_ms_each=1e3 * clock.decode_s / max(clock.steps, 1),
                   prefill_share=clock.prefill_s / summary["makespan_s"])
    return summary, results


class _TokenQueue:
    """A transformers streamer handing each new token id to an asyncio queue (None: the end)."""

    def __init__(self, loop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value):
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def baseline_app(held: dict, tokenizer):
    """One request at a time: an asyncio.Lock around set_adapter + model.generate, tokens streamed as made.

    The PeftModel is ``held["model"]``; clearing ``held`` frees it (FastAPI's module-level caches keep every
    endpoint function, and so what it refers to, alive after the app is gone)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    class Streamer(_TokenQueue, BaseStreamer):
        pass

    app = FastAPI()
    lock = asyncio.Lock()
    worker = held["worker"] = ThreadPoolExecutor(1)
    eos = {tokenizer.eos_token_id, held["model"].generation_config.eos_token_id} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await request.json()
        name, prompt, max_tokens = body["model"], body["prompt"], body["max_tokens"]

        async def stream():
            async with lock:
                loop = asyncio.get_running_loop()
                queue: asyncio.Queue = asyncio.Queue()
                streamer = Streamer(loop, queue)

                def generate():
                    peft_model = held["model"]
                    try:
                        peft_model.set_adapter(name)
                        ids = torch.tensor([prompt])
                        with torch.no_grad():
                            peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                max_new_tokens=max_tokens, streamer=streamer, pad_token_id=pad)
                    finally:
                        streamer.end()

                job = loop.run_in_executor(worker, generate)
                tokens, emitted = [], 0
                while (token := await queue.get()) is not None:
                    if token in eos:
                        continue
                    tokens.append(token)
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    ready = len(text) - 1 if text.endswith("\ufffd") else len(text)
                    if ready > emitted:
                        yield sse({"object": "text_completion", "choices": [{"index": 0, "text": text[emitted:ready],
                                                                             "finish_reason": None}]})
                        emitted = ready
                await job
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > emitted:
                    yield sse({"object": "text_completion", "choices": [{"index": 0, "text": text[emitted:],
                                                                         "finish_reason": None}]})
                yield sse({"object": "text_completion", "choices": [],
                           "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                                     "total_tokens": len(prompt) + len(tokens)}})
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def run_baseline(model, tokenizer, dirs: list[Path], requests: list[Request], args) -> tuple[dict, list[dict]]:
    from peft import PeftModel

    from lorakit.serve.app import running

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        peft_model.load_adapter(str(d), adapter_name=f"a{i}")
    peft_model.eval()
    held = {"model": peft_model}
    with running(baseline_app(held, tokenizer)) as url:
        warm_up(url, len(dirs), min(2, args.warmup_requests))
        wait_quiet(args.wait_quiet)
        with ForeignLoad() as load:
            results = drive(url, requests)
    held.pop("worker").shutdown()
    held.clear()
    del peft_model
    gc.collect()
    summary = summarise(results)
    summary.update(other_cores=load.cores)
    return summary, results


THROUGHPUT = ("req_s", "tok_s")


def _mean_row(system: str, n: int, popularity: str, runs: list[tuple[dict, list]]) -> dict:
    """One table row: the means of ``runs``' summaries over the passes, and each pass's throughput."""
    summaries = [summary for summary, _ in runs]
    row = {"system": system, "adapters": n, "popularity": popularity}
    for key, value in summaries[0].items():  # numbers: the mean; anything else: one per pass
        row[key] = statistics.fmean(s[key] for s in summaries) if isinstance(value, (int, float)) else \
            [s[key] for s in summaries]
    for key in THROUGHPUT:
        row[f"{key}_passes"] = [s[key] for s in summaries]
    row["tok_s_spread"] = (max(row["tok_s_passes"]) - min(row["tok_s_passes"])) / 2 / row["tok_s"]
    return row


def bench_http(model, tokenizer, dirs: list[Path], args) -> list[dict]:
    """Every configuration once per pass, the order reversed in every other pass (A B C, C B A: slow drift of
    the machine cancels in the means); the baseline once, after the middle pass."""
    # with one adapter both popularities draw the same workload: it runs once
    configs = [(n, pop) for n in args.adapters for pop in (args.popularity[:1] if n == 1 else args.popularity)]
    works = {c: workload(args, len(tokenizer), *c) for c in configs}
    runs: dict[tuple, list] = {c: [] for c in configs}
    bare: dict[tuple, list] = {c: [] for c in configs if c[0] in args.engine_only and c[1] == args.popularity[0]}
    baselines = {}
    for p in range(args.passes):
        for n, pop in configs if p % 2 == 0 else configs[::-1]:
            runs[n, pop].append(run_ours(model, tokenizer, dirs[:n], works[n, pop], args))
            print(f"  http ours {n} {pop}, pass {p + 1}: {runs[n, pop][-1][0]}", file=sys.stderr, flush=True)
            if (n, pop) in bare:
                bare[n, pop].append(run_engine_only(model, tokenizer, dirs[:n], works[n, pop], args))
                print(f"  engine only {n} {pop}, pass {p + 1}: {bare[n, pop][-1][0]}", file=sys.stderr, flush=True)
        if p == (args.passes - 1) // 2:
            for n, pop in configs:
                if n in args.baseline_adapters and pop in args.baseline_popularity:
                    baselines[n, pop] = run_baseline(model, tokenizer, dirs[:n], works[n, pop], args)
                    print(f"  http baseline {n} {pop}: {baselines[n, pop][0]}", file=sys.stderr, flush=True)
    rows = []
    for n, pop in configs:
        label = "any" if n == 1 else pop
        rows.append(_mean_row("lorakit serve", n, label, runs[n, pop]))
        if (n, pop) in bare:
            rows.append(_mean_row("lorakit engine, no HTTP", n, label, bare[n, pop]))
        if (n, pop) in baselines:
            base, base_results = baselines[n, pop]
            ours_results = runs[n, pop][0][1]
            same = sum(a["text"] == b["text"] for a, b in zip(ours_results, base_results))
            same_tokens = sum(a["tokens"] == b["tokens"] for a, b in zip(ours_results, base_results))
            rows.append({"system": "baseline (PEFT, 1 at a time)", "adapters": n, "popularity": label, **base,
                         "identical_answers": same, "same_token_counts": same_tokens})
    return rows


# --- one decode step on the engine --------------------------------------------------------------------
def _engine(model, tokenizer, adapters, prompts: list[list[int]], route: list[int | None], batch: int):
    """An engine (not started) on ``adapters`` (an engine.Adapters on ``model``) holding ``batch`` prefilled rows
    that never finish (EOS off, no token limit); row i uses adapter a{route[i]} (None: the base)."""
    from lorakit.serve.engine import Engine, Generation, Sampling

    engine = Engine(model, tokenizer, adapters, max_batch=batch)
    engine.eos, engine.errors = set(), []
    sink = lambda event: engine.errors.append(event) if "error" in event else None  # noqa: E731
    engine.waiting.extend(Generation(p, None if a is None else f"a{a}", Sampling(max_tokens=10 ** 9), sink)
                          for p, a in zip(prompts, route))
    with torch.no_grad():
        engine._admit()
    assert len(engine.running) == batch and not engine.errors, (len(engine.running), engine.errors[:1])
    return engine


def _loaded(model, dirs: list[Path]):
    """An engine.Adapters with ``dirs`` loaded on ``model`` as a0, a1, ..."""
    from lorakit.serve.engine import Adapters

    adapters = Adapters(model, max(1, len(dirs)))
    for i, d in enumerate(dirs):
        adapters.add(f"a{i}", d)
    return adapters


def bench_step(model, tokenizer, dirs: list[Path], args) -> dict:
    batch, n, many = args.step_batch, args.step_adapters, max(args.adapters)
    rng = random.Random(args.seed + 2)
    prompts = [[rng.randrange(FIRST_TOKEN, len(tokenizer)) for _ in range(rng.randint(*PROMPT_LEN))]
               for _ in range(batch)]
    plain, adapted = copy.deepcopy(model), copy.deepcopy(model)
    served = _loaded(adapted, dirs[:n])
    engines = {"plain model": _engine(plain, tokenizer, _loaded(plain, []), prompts, [None] * batch, batch),
               f"mixed, {n} adapters": _engine(adapted, tokenizer, served, prompts, [i % n for i in range(batch)],
                                               batch),
               "one adapter": _engine(adapted, tokenizer, served, prompts, [0] * batch, batch),
               "adapted model, base rows": _engine(adapted, tokenizer, served, prompts, [None] * batch, batch)}
    if many > n:  # the engine-level form of "64 adapters against 1", each on a model of its own
        single, widest = copy.deepcopy(model), copy.deepcopy(model)
        engines["1 adapter loaded"] = _engine(single, tokenizer, _loaded(single, dirs[:1]), prompts, [0] * batch,
                                              batch)
        engines[f"{many} adapters loaded, {min(batch, many)} in the batch"] = _engine(
            widest, tokenizer, _loaded(widest, dirs[:many]), prompts, [i % many for i in range(batch)], batch)

    def step(engine):
        def run():
            with torch.no_grad():
                engine._decode()
        return run

    def forward_only(engine):
        """The decode step's forward alone (same inputs as _decode; the slab does not advance)."""
        def run():
            with torch.no_grad():
                rows = engine.running
                ids = torch.tensor([[g.generated[-1]] for g in rows])
                positions = torch.tensor([[g.cached] for g in rows])
                engine.slab.prepare_step()
                with lk.route(engine.model, [engine._internal(g) for g in rows]):
                    engine.model(input_ids=ids, attention_mask=engine.slab.mask(engine.device), position_ids=positions,
                                 use_cache=True, logits_to_keep=1, **{engine._cache_arg: engine.slab.cache()},
                                 cache_position=torch.tensor([engine.slab.n]))
        return run

    wait_quiet(args.wait_quiet)
    with ForeignLoad() as load:
        steps = harness.round_robin({k: step(e) for k, e in engines.items()}, args.step_repeats, warmup=2)
        forwards = harness.round_robin({k: forward_only(e) for k, e in engines.items()}, args.step_repeats, warmup=1)
    for label, engine in engines.items():
        assert not engine.errors and len(engine.running) == batch, (label, engine.errors[:1])
        assert engine.steps == args.step_repeats + 2, (label, engine.steps)
    plain_step, plain_fwd = steps["plain model"], forwards["plain model"]
    out = {"batch": batch, "adapters": n, "many": many, "repeats": args.step_repeats, "other_cores": load.cores,
           "kv_columns_at_end": engines["plain model"].slab.n,
           "rows": [{"engine": k, "step_ms": 1e3 * steps[k], "vs_plain": steps[k] / plain_step,
                     "forward_ms": 1e3 * forwards[k], "forward_vs_plain": forwards[k] / plain_fwd,
                     "outside_forward_ms": 1e3 * (steps[k] - forwards[k])} for k in engines]}
    print(f"  step: {out}", file=sys.stderr, flush=True)
    return out


# --- prefill: one request at a time (as the engine does) against one batched forward -------------------
def bench_prefill(model, tokenizer, dirs: list[Path], args) -> dict:
    """Prefill of ``--step-batch`` prompts of the workload's lengths over ``--step-adapters`` adapters, into an
    engine's slab: one request per forward, against the engine's own admission of them all at once
    (``Engine._admit``: the same as one at a time where the engine prefills alone), and, for reference, one
    left-padded routed forward of all of them (a DynamicCache, no slab)."""
    from transformers import DynamicCache

    from lorakit.serve.engine import Engine, Generation, Sampling

    batch, n = args.step_batch, args.step_adapters
    rng = random.Random(args.seed + 3)
    prompts = [[rng.randrange(FIRST_TOKEN, len(tokenizer)) for _ in range(rng.randint(*PROMPT_LEN))]
               for _ in range(batch)]
    route = [i % n for i in range(batch)]
    adapted = copy.deepcopy(model)
    adapters = _loaded(adapted, dirs[:n])
    names = [adapters.internal[f"a{a}"] for a in route]
    firsts: dict[str, list[int]] = {}

    def generations():
        return [Generation(p, f"a{a}", Sampling(max_tokens=10 ** 9), lambda event: None)
                for p, a in zip(prompts, route)]

    def alone():
        engine, gens = Engine(adapted, tokenizer, adapters, max_batch=batch), generations()
        with torch.no_grad():
            for g in gens:
                engine._prefill([[g]])
        firsts["alone"] = [g.generated[0] if g.generated else -1 for g in gens]

    def admitted():
        engine, gens = Engine(adapted, tokenizer, adapters, max_batch=batch), generations()
        clock = EngineClock(engine)
        engine.waiting.extend(gens)
        with torch.no_grad():
            engine._admit()
        assert len(engine.running) == batch
        firsts["engine"] = [g.generated[0] if g.generated else -1 for g in gens]
        firsts["forwards"] = [clock.prefill_forwards]

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache_arg = "cache" if "cache" in inspect.signature(adapted.forward).parameters else "past_key_values"

    def padded():
        with torch.no_grad(), lk.route(adapted, names):
            out = adapted(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{cache_arg: DynamicCache()})
        firsts["padded"] = out.logits[:, -1].argmax(-1).tolist()

    wait_quiet(args.wait_quiet)
    with ForeignLoad() as load:
        t = harness.round_robin({"alone": alone, "engine": admitted, "padded": padded}, args.prefill_repeats,
                                warmup=1)
    same = lambda key: sum(a == b for a, b in zip(firsts["alone"], firsts[key]))  # noqa: E731
    out = {"prompts": batch, "adapters": n, "prompt_tokens": sum(len(p) for p in prompts),
           "padded_tokens": batch * width, "repeats": args.prefill_repeats, "other_cores": load.cores,
           "engine_forwards": firsts["forwards"][0],
           "alone_ms": 1e3 * t["alone"], "alone_ms_each": 1e3 * t["alone"] / batch,
           "engine_ms": 1e3 * t["engine"], "padded_ms": 1e3 * t["padded"],
           "engine_speedup": t["alone"] / t["engine"], "padded_speedup": t["alone"] / t["padded"],
           "engine_same_first_token": same("engine"), "padded_same_first_token": same("padded")}
    print(f"  prefill: {out}", file=sys.stderr, flush=True)
    return out


# --- report ---------------------------------------------------------------------------------------
def targets_met(results: dict, args) -> list[dict]:
    out = []
    http = results.get("http", [])
    find = lambda system, n, pop: next((r for r in http if r["system"].startswith(system) and  # noqa: E731
                                        r["adapters"] == n and r["popularity"] in (pop, "any")), None)
    for pop in args.popularity:
        ours, base = find("lorakit serve", 16, pop), find("baseline", 16, pop)
        base_pop = pop
        if ours and not base:  # the baseline's work does not depend on which adapter a request names
            base_pop = next((p for p in args.popularity if find("baseline", 16, p)), None)
            base = find("baseline", 16, base_pop) if base_pop else None
        if ours and base:
            value = ours["tok_s"] / base["tok_s"]
            against = "" if base_pop == pop else f" (baseline run on the {base_pop} draw)"
            out.append({"target": f"16 adapters, {pop}: ours / baseline tokens/s >= 8{against}", "value": value,
                        "requests_ratio": ours["req_s"] / base["req_s"], "met": value >= 8})
        one, many = find("lorakit serve", 1, pop), find("lorakit serve", 64, pop)
        if one and many:
            value = many["tok_s"] / one["tok_s"]
            out.append({"target": f"{pop}: tokens/s at 64 adapters / at 1 >= 0.9", "value": value,
                        "requests_ratio": many["req_s"] / one["req_s"], "met": value >= 0.9})
    if "step" in results:
        s = results["step"]
        mixed = next(r for r in s["rows"] if r["engine"].startswith("mixed"))
        out.append({"target": f"decode step, batch {s['batch']}, {s['adapters']} adapters / plain model <= 1.35",
                    "value": mixed["vs_plain"], "met": mixed["vs_plain"] <= 1.35})
        rows = {r["engine"]: r for r in s["rows"]}
        wide = next((r for k, r in rows.items() if k.startswith(f"{s['many']} adapters loaded")), None)
        if wide and "1 adapter loaded" in rows:
            value = rows["1 adapter loaded"]["step_ms"] / wide["step_ms"]
            out.append({"target": f"engine: decode steps/s, {wide['engine']} / 1 adapter loaded >= 0.9",
                        "value": value, "met": value >= 0.9})
    return out


def report(results: dict, args) -> None:
    t = harness.table
    print(f"\n{results['model']}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads on "
          f"{os.cpu_count()} cores; LoRA r={args.rank} on {args.targets}; {args.requests} requests, Poisson "
          f"{args.rate}/s, prompts {PROMPT_LEN[0]}-{PROMPT_LEN[1]}, outputs {OUTPUT_LEN[0]}-{OUTPUT_LEN[1]} tokens; "
          f"ours max batch {args.max_batch}")
    if "http" in results:
        print("\n1. HTTP on loopback, streaming (TTFT: send to first text chunk; TPOT: per request, "
              "(last - first chunk) / (tokens - 1))")
        print(t(results["http"], [("system", "system", ""), ("adapters", "adapters", "d"),
                                  ("popularity", "popularity", ""), ("req_s", "req/s", ".2f"),
                                  ("tok_s", "out tok/s", ".1f"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                                  ("ttft_p99_ms", "TTFT p99 ms", ".0f"), ("tpot_p50_ms", "TPOT p50 ms", ".1f"),
                                  ("tpot_p99_ms", "TPOT p99 ms", ".1f"), ("makespan_s", "makespan s", ".1f"),
                                  ("completion_tokens", "tokens", ".0f"), ("rows_per_step", "rows/step", ".1f"),
                                  ("prefill_share", "prefill share", ".2f"),
                                  ("identical_answers", "same answers", "d"), ("other_cores", "other load", ".2f")]))
        if args.passes > 1:
            print(f"ours: means of {args.passes} passes (order reversed every other pass); tokens/s of each pass "
                  "in the JSON (tok_s_passes)")
    if "step" in results:
        s = results["step"]
        print(f"\n2. one decode step on the engine, batch {s['batch']} (KV up to {s['kv_columns_at_end']} columns), "
              f"medians of {s['repeats']} round-robin; other load {s['other_cores']:.2f}")
        print(t(s["rows"], [("engine", "engine", ""), ("step_ms", "Engine._decode ms", ".1f"),
                            ("vs_plain", "/ plain", ".3f"), ("forward_ms", "forward ms", ".1f"),
                            ("forward_vs_plain", "fwd / plain", ".3f"),
                            ("outside_forward_ms", "outside fwd ms", ".1f")]))
    if "prefill" in results:
        p = results["prefill"]
        print(f"\n3. prefill of {p['prompts']} prompts ({p['prompt_tokens']} tokens) over {p['adapters']} adapters "
              f"into the slab; other load {p['other_cores']:.2f}")
        print(harness.table([
            {"how": "one request per forward", "ms": p["alone_ms"], "speedup": 1.0, "same": p["prompts"]},
            {"how": f"Engine._admit ({p['engine_forwards']} forwards)", "ms": p["engine_ms"],
             "speedup": p["engine_speedup"], "same": p["engine_same_first_token"]},
            {"how": f"one left-padded forward, {p['padded_tokens']} positions (reference)", "ms": p["padded_ms"],
             "speedup": p["padded_speedup"], "same": p["padded_same_first_token"]}],
            [("how", "prefill", ""), ("ms", "ms", ".0f"), ("speedup", "speed-up", ".2f"),
             ("same", "same first token as alone", "d")]))
    goals = targets_met(results, args)
    print("\ntargets")
    print(t([{**g, "met": "yes" if g["met"] else "NO"} for g in goals],
            [("target", "target", ""), ("value", "value", ".3f"), ("requests_ratio", "req/s ratio", ".3f"),
             ("met", "met", "")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="requests per configuration (default 64)")
    parser.add_argument("--rate", type=float, default=50.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--adapters", default=None, help="adapter counts (default 1,4,16,64)")
    parser.add_argument("--popularity", default="uniform,zipf")
    parser.add_argument("--zipf-alpha", type=float, default=1.0)
    parser.add_argument("--baseline-adapters", default=None, help="counts the baseline also runs (default 16; '': none)")
    parser.add_argument("--engine-only", default=None,
                        help="counts that also run straight on the engine, no HTTP (first popularity; default 16; '': "
                             "none)")
    parser.add_argument("--baseline-popularity", default="uniform",
                        help="popularities the baseline also runs (its work does not depend on the adapter)")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=64, help="ours: --max-batch (the server's default)")
    parser.add_argument("--warmup-requests", type=int, default=4)
    parser.add_argument("--passes", type=int, default=1,
                        help="runs of every configuration of ours, alternating the order (the baseline runs once)")
    parser.add_argument("--step-batch", type=int, default=None, help="rows of the decode-step check (default 32)")
    parser.add_argument("--step-adapters", type=int, default=None, help="adapters in it (default 16)")
    parser.add_argument("--step-repeats", type=int, default=10)
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--sections", default="step,prefill,http")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed run wait up to this long for other processes to go idle")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model, 8 requests, 1 and 4 adapters: a smoke run in seconds")
    parser.add_argument("--json", default=None,
                        help="results file (default benchmarks/results/serve.json; --quick: serve-quick.json)")
    args = parser.parse_args()
    q = args.quick
    args.requests = args.requests or (8 if q else 64)
    args.adapters = [int(v) for v in (args.adapters or ("1,4" if q else "1,4,16,64")).split(",")]
    base = ("4" if q else "16") if args.baseline_adapters is None else args.baseline_adapters
    args.baseline_adapters = [int(v) for v in base.split(",") if v]
    args.popularity = args.popularity.split(",")
    only = ("4" if q else "16") if args.engine_only is None else args.engine_only
    args.engine_only = [int(v) for v in only.split(",") if v]
    args.baseline_popularity = args.baseline_popularity.split(",")
    args.step_batch = args.step_batch or (4 if q else 32)
    args.step_adapters = args.step_adapters or (4 if q else 16)
    if q:
        args.step_repeats = min(args.step_repeats, 5)
    args.json = args.json or f"benchmarks/results/serve{'-quick' if q else ''}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        model, tokenizer, name = load_model(args, tmp)
        count = max(args.adapters + args.baseline_adapters + [args.step_adapters])
        made = time.perf_counter()
        dirs = make_adapters(model, count, args, tmp / "adapters")
        results: dict = {"model": name, "adapter_logit_change_min": check_adapters_differ(model, dirs, tokenizer),
                         "adapters_made_s": time.perf_counter() - made}
        print(f"  made {count} adapters in {results['adapters_made_s']:.1f} s", file=sys.stderr, flush=True)
        if "step" in sections:
            results["step"] = bench_step(model, tokenizer, dirs, args)
            gc.collect()
        if "prefill" in sections:
            results["prefill"] = bench_prefill(model, tokenizer, dirs, args)
            gc.collect()
        if "http" in sections:
            results["http"] = bench_http(model, tokenizer, dirs, args)
    results["wall_s"] = time.perf_counter() - started
    report(results, args)
    print(f"\nwall time {results['wall_s']:.0f} s")
    import peft
    import transformers

    harness.write_json(args.json, {"peft": peft.__version__, "transformers": transformers.__version__,
                                   "args": vars(args), **results, "targets": targets_met(results, args)})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
