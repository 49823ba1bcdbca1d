"""``Engine``: one base model, many adapters (LoRA and its kin, virtual tokens), continuous batching in a
background thread.

Each step of the loop (``_step``):

1. aborted sequences leave the batch;
2. waiting requests join while slots are free (first come, first served), each pinned to the
   adapter version current when it was submitted; an adapter not in the model is made ready
   first (least recently used idle one evicted); the new sequences' prompts run in one
   left-padded prefill forward that writes their slots of the KV cache and samples their first
   tokens (a prompt tuning, P-tuning or prefix tuning row has its adapter's virtual-token prefix
   written in its slot first: ``virtual_rows``);
3. every running sequence decodes one token in one forward: rows at their own positions over the
   preallocated ``SlotKVCache``, each row with its own adapter (the core's per-row route: layers
   gather each row's factors from their banks, and keep the gathered factors while the batch's
   membership does not change);
4. finished sequences (eos, a stop token or string, ``max_tokens``, the context's end) leave and
   free their slot; their request's deltas and output are handed to its ``RequestHandle``.

Who does what: ``scheduler`` (queues, the running batch, admission, reaping), ``runner`` (the
forward inputs, the KV cache, the forward pass with adapter routing, the sampling call) and
``detokenize`` (text, stop tokens and strings, deltas and outputs); the engine wires them to the
caller's API and the background thread.

Locks: ``_model_lock`` is held for a whole step and for anything that changes the model
(adding/removing adapters); ``_lock`` guards the queues and tables and is held only briefly, so
``submit`` never waits for a forward pass.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from pathlib import Path

from deltatune import devices
from deltatune.adapter_set import BASE_NAME
from deltatune.generation import pad_id, stop_token_ids
from deltatune.serving.adapters import AdapterInfo, check_name, file_stamp, read_version_files
from deltatune.serving.detokenize import Detokenizer
from deltatune.serving.errors import BadRequest, PromptTooLong, RequestFailed, ServingError
from deltatune.serving.outputs import RequestHandle, RequestOutput
from deltatune.serving.requests import Request, Seq
from deltatune.serving.runner import ModelRunner, engine_dtype
from deltatune.serving.sampling import SamplingParams, make_generator
from deltatune.serving.scheduler import Scheduler

log = logging.getLogger(__name__)


class Engine:
    """Serve one base model and many adapters with continuous batching.

    Args:
        base: ``"default"`` (SmolLM2-135M-Instruct), a transformers directory or a GGUF file.
        max_loras: adapters injected in the model at once (the "ready" bank), default 8.
        max_cpu_loras: further adapters kept as tensors in host memory, default 64.
        max_lora_rank: adapters of a higher rank are refused at load, default 64.
        max_num_seqs: sequences decoded together (KV cache slots), default 32.
        max_waiting: requests queued beyond the running ones and the free slots before ``submit``
            raises QueueFull (so ``max_num_seqs + max_waiting`` single-sequence requests fit at once).
        max_model_len: context length (prompt + completion); default the model's, at most 2048.
        device, dtype: default (None or "auto") CUDA with bf16 where the GPU supports it, else CPU with
            fp32 (``deltatune.devices``; the engine keeps fp32 on every CPU, its fast paths are fp32);
            a dtype may be a ``torch.dtype`` or a name ("float32", "bfloat16", "float16", "bf16", ...).
        served_name: the name the base is served under (default ``"default"`` or the directory's name).
        max_prefill_tokens: padded prompt tokens one prefill forward takes at most (more wait a step).
        pack_weights: keep the base's linear weights also pre-packed for MKL's GEMM at
            ``max_num_seqs`` rows (``deltatune.serving.packed``: full-batch decode steps run faster,
            same results, about 1 GB more memory for the default model). Default (None): on CPU in
            float32 where PyTorch has MKL; True where that does not hold raises ValueError.

    Use ``generate`` (blocking), or ``start()`` and ``submit`` (what the HTTP server does);
    ``with Engine(...) as engine:`` starts and shuts the loop down.
    """

    def __init__(self, base="default", *, max_loras: int = 8, max_cpu_loras: int = 64, max_lora_rank: int = 64,
                 max_num_seqs: int = 32, max_waiting: int = 256, max_model_len: int | None = None,
                 device=None, dtype=None, served_name: str | None = None, max_prefill_tokens: int = 4096,
                 pack_weights: bool | None = None) -> None:
        from deltatune import models

        for name, value in (("max_loras", max_loras), ("max_num_seqs", max_num_seqs),
                            ("max_lora_rank", max_lora_rank), ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(max_cpu_loras, int) or max_cpu_loras < 0 or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_cpu_loras and max_waiting must be integers >= 0, got {max_cpu_loras!r}, {max_waiting!r}")
        self.device = devices.pick_device(device)
        self.dtype = engine_dtype(dtype, self.device)
        model = models.load(base, dtype=self.dtype).to(self.device).eval()
        self.runner = ModelRunner(model, self.device, self.dtype, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, pack_weights=pack_weights, max_loras=max_loras,
                                  max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank)
        self.model, self.pool, self.cache = model, self.runner.pool, self.runner.cache
        self.packed_linears, self.fused_norms = self.runner.packed_linears, self.runner.fused_norms
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = models.load_tokenizer(base)
        self.base_name = served_name or (models.DEFAULT if base == models.DEFAULT else Path(os.fspath(base)).name)
        self.max_num_seqs, self.max_waiting, self.max_prefill_tokens = max_num_seqs, max_waiting, max_prefill_tokens
        stops = stop_token_ids(self.tokenizer, model)
        self._eos, self._pad = set(stops), pad_id(self.tokenizer, stops)
        self.detokenizer = Detokenizer(self.tokenizer, self._eos)
        self._stats = dict(requests_total=0, requests_finished=0, tokens_generated_total=0, prompt_tokens_total=0,
                           steps_total=0, prefill_steps_total=0)
        self.scheduler = Scheduler(self.pool, self.cache, max_num_seqs, max_waiting, max_prefill_tokens, self._stats)
        self._model_lock = threading.RLock()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, path, *, replace: bool = False) -> AdapterInfo:
        """Load the adapter directory ``path`` under ``name``, checked now (files, rank, fit to the base,
        mixability). ``replace=True`` makes a new version of an existing name (vLLM's load_inplace):
        requests already submitted finish on the version they started with.

        Any client string following ``adapters.NAME_RULE`` is a name (dots included: the model
        holds each version under an internal name the pool makes).

        Raises:
            AdapterLoadError: why the adapter cannot be served (a bad name quotes the rule); ``param``
                names the request field.
        """
        check_name(name, (self.base_name, BASE_NAME))
        stamp = file_stamp(path)
        config, tensors = read_version_files(path)
        with self._model_lock, self._lock:
            v = self.pool.add(name, path, config, tensors, replace, self.scheduler.busy(), stamp)
            return AdapterInfo(v.name, v.path, v.rank, self.pool.state(v), v.version)

    def remove_adapter(self, name: str) -> None:
        """Unload ``name``; requests already submitted for it still finish. Raises UnknownModel."""
        with self._model_lock, self._lock:
            self.pool.remove(name)

    def adapters(self) -> list[AdapterInfo]:
        """Every served adapter: name, path, rank, state ("ready", "cpu" or "disk") and version."""
        with self._lock:
            return self.pool.infos()

    # -- requests ------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], adapter: str | None = None, sampling: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue one request and return its handle at once (the engine loop must be running,
        ``start()``, or ``generate`` drives it).

        Raises:
            UnknownModel: ``adapter`` is neither the base's name nor a loaded adapter.
            BadRequest / PromptTooLong: an empty or over-long prompt, bad token ids, bad sampling.
            QueueFull: ``max_waiting`` requests wait already.
        """
        return self._submit(prompt, adapter, sampling, request_id, bounded=True)

    def _submit(self, prompt, adapter, sampling, request_id, bounded: bool) -> RequestHandle:
        params = sampling if sampling is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise BadRequest(f"sampling must be SamplingParams, got {type(params).__name__}", "sampling")
        if params.n > self.max_num_seqs:
            raise BadRequest(f"n={params.n} is above max_num_seqs={self.max_num_seqs}: the completions of a request "
                             "run together", "n")
        text, ids = self._tokenize(prompt)
        room = self._room(ids, params, 0)
        with self._lock:
            if self._stopping:
                raise ServingError("the engine is shutting down")
            if bounded:
                self.scheduler.check_room()
            version = None
            if adapter is not None and adapter not in (self.base_name, BASE_NAME):
                version = self.pool.resolve(adapter)
            if version is not None and version.virtual:  # its prefix takes positions of the context
                room = self._room(ids, params, version.virtual)
            rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            if rid in self.scheduler.requests:
                raise BadRequest(f"request_id {rid!r} is already running", "request_id")
            handle = RequestHandle(rid, len(ids), lambda: self._abort(rid))
            req = Request(rid, text, ids, params, version, handle)
            max_new = min(params.max_tokens or room, room)
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                gen = None if params.greedy else make_generator(seed, self.device)
                req.seqs.append(Seq(req, i, gen, max_new))
            self.scheduler.enqueue(req)
            self._wake.notify_all()
        return handle

    def _room(self, ids: list[int], params: SamplingParams, virtual: int) -> int:
        """New tokens that fit after the prompt ``ids`` and ``virtual`` virtual tokens (a
        virtual-token adapter's prefix takes positions of the row's context). Raises
        PromptTooLong / BadRequest when the prompt or ``max_tokens`` does not fit."""
        room = self.max_model_len - virtual - len(ids)
        extra = f" after the adapter's {virtual} virtual tokens" if virtual else ""
        if room < 1:
            if not virtual:
                raise PromptTooLong(len(ids), self.max_model_len)
            raise BadRequest(f"the prompt has {len(ids)} tokens{extra} but this model's maximum context length is "
                             f"{self.max_model_len} tokens (the prompt must leave room for at least one new token)",
                             "prompt")
        if params.max_tokens is not None and params.max_tokens > room:
            raise BadRequest(f"max_tokens={params.max_tokens} is too large: the prompt has {len(ids)} tokens{extra} "
                             f"and this model's maximum context length is {self.max_model_len} tokens, so at most "
                             f"{room} new tokens fit", "max_tokens")
        return room

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("the prompt is empty", "prompt")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in prompt):
            vocab = self.runner.vocab
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise BadRequest(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
            return None, list(prompt)
        raise BadRequest("the prompt must be a non-empty string or a non-empty list of token ids", "prompt")

    def generate(self, prompts, adapter=None, sampling=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` (a string or token-id list, or a list of them) to completion and return one
        ``RequestOutput`` each, in order. ``adapter``: one name for all, or one per prompt (None or the
        base's name: the base). ``sampling``: one ``SamplingParams`` or one per prompt.

        Raises what ``submit`` raises (before anything runs)."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                               and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(adapters) != len(prompts) or len(samplings) != len(prompts):
            raise BadRequest(f"{len(prompts)} prompts but {len(adapters)} adapters and {len(samplings)} sampling "
                             "params; give one for all or one per prompt", "adapter")
        handles = []
        try:
            for p, a, s in zip(prompts, adapters, samplings):
                handles.append(self._submit(p, a, s, None, bounded=False))
        except BaseException:
            for h in handles:
                h.abort()
            raise
        from tqdm.auto import tqdm

        bar = tqdm(total=len(handles), desc="generate", unit="req", disable=not use_tqdm)
        done = 0
        while done < len(handles):
            if not self.running:
                self._guarded_step()
            else:
                handles[done].result()
            now = sum(h.finished for h in handles)
            bar.update(now - done)
            done = now
        bar.close()
        return [h.result() for h in handles]

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self.scheduler.abort(request_id)
            self._wake.notify_all()

    # -- the loop ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the background loop runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the background thread that runs steps while there is work."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop; requests still waiting or running end with finish_reason "abort". The
        engine can be started again (or used through ``generate``) afterwards."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._model_lock, self._lock:
            self.scheduler.abort_all()
            self._stopping = False   # usable again: generate() or start()

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and self.scheduler.idle:
                    self._wake.wait()
                if self._stopping:
                    return
            self._guarded_step()

    def _guarded_step(self) -> None:
        try:
            self._step()
        except Exception as exc:  # keep serving: fail what was in the batch (their handles raise), log why
            log.exception("engine step failed")
            self._fail_all(exc)

    def _fail_all(self, exc: Exception) -> None:
        with self._model_lock, self._lock:
            error = ServingError(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
            self.scheduler.fail_running(error)

    def _step(self) -> bool:
        """One round: reap aborted, admit waiting (one prefill), decode every running sequence."""
        sched = self.scheduler
        with self._model_lock:
            with self._lock:
                sched.reap()
                joined = sched.admit()
                self._stats["steps_total"] += 1
            if joined:
                logits = self.runner.prefill(joined, self._pad)
                self._stats["prefill_steps_total"] += 1
                self._advance(joined, logits)
            if sched.running:
                self._advance(sched.running, self.runner.decode(sched.running))
            return bool(joined or sched.running)

    def _advance(self, seqs: list[Seq], logits) -> None:
        """Sample each row's token, stream the deltas, complete finished requests, compact the batch.
        A row that cannot go on (non-finite logits or sampling, a decoding error) fails its own
        request only; the other rows are delivered as usual."""
        tokens, errors = self.runner.sample(seqs, logits, self._eos)
        with self._lock:
            failed: dict = {}
            done = []
            for row, (s, token) in enumerate(zip(seqs, tokens)):
                if s.req in failed:
                    continue
                if row in errors:
                    failed[s.req] = RequestFailed(errors[row])
                    continue
                try:
                    done.append((s, self.detokenizer.append(s, token)))
                except Exception as exc:  # noqa: BLE001 — this request's text only: fail it, not the batch
                    log.exception("decoding a token failed")
                    failed[s.req] = RequestFailed(f"decoding token {token} failed: {type(exc).__name__}: {exc}")
            done = [(s, delta) for s, delta in done if s.req not in failed]
            self.scheduler.fail_rows(failed)
            self.scheduler.deliver([s for s, _ in done], [delta for _, delta in done])

    # -- figures -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters for /metrics: running and waiting sequences/requests, adapters per tier, totals."""
        with self._lock:
            states = [self.pool.state(v) for v in self.pool.current.values()]
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                    "adapters_ready": states.count("ready"), "adapters_cpu": states.count("cpu"),
                    "adapters_disk": states.count("disk"), "kv_cache_bytes": self.cache.nbytes,
                    "max_num_seqs": self.max_num_seqs, **self._stats}
