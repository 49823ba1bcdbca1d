"""``Engine``: one base model, many LoRA adapters, continuous batching in a background thread.

Each step of the loop (``_step``):

1. aborted sequences leave the batch;
2. waiting requests join while slots are free (first come, first served), each pinned to the
   adapter version current when it was submitted; an adapter not in the model is made ready
   first (least recently used idle one evicted); the new sequences' prompts run in one
   left-padded prefill forward that writes their slots of the KV cache and samples their first
   tokens;
3. every running sequence decodes one token in one forward: rows at their own positions over the
   preallocated ``SlotKVCache``, each row with its own adapter (the core's per-row route: layers
   gather each row's factors from their banks, and keep the gathered factors while the batch's
   membership does not change);
4. finished sequences (eos, a stop token or string, ``max_tokens``, the context's end) leave and
   free their slot; their request's deltas and output are handed to its ``RequestHandle``.

Locks: ``_model_lock`` is held for a whole step and for anything that changes the model
(adding/removing adapters); ``_lock`` guards the queues and tables and is held only briefly, so
``submit`` never waits for a forward pass.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune.adapter_set import BASE_NAME
from deltatune.serving import norms, packed
from deltatune.serving.adapters import AdapterInfo, AdapterPool, Version, read_version_files
from deltatune.serving.errors import BadRequest, PromptTooLong, QueueFull, ServingError, UnknownModel
from deltatune.serving.kv_cache import SlotKVCache, decode_mask, prefill_mask
from deltatune.serving.outputs import CompletionOutput, RequestHandle, RequestOutput, StreamDelta
from deltatune.serving.sampling import SamplingParams, make_generator, sample

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048   # when the model allows more: bounds the KV cache's allocation
CLEAN_CHUNK = 64               # KV positions are zeroed this many at a time on first use


@dataclass(eq=False)
class _Request:
    id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    version: Version | None            # None: the base model
    handle: RequestHandle
    arrival: float = field(default_factory=time.perf_counter)
    seqs: list = field(default_factory=list)
    aborted: bool = False
    done: bool = False


@dataclass(eq=False)
class _Seq:
    req: _Request
    index: int
    generator: torch.Generator | None
    max_new: int
    tokens: list[int] = field(default_factory=list)
    pos: int = 0                       # cache position the last token goes to (prompt + tokens - 1)
    row: int = -1
    text: str = ""                     # decoded completion so far (cut at a stop string once found)
    sent_chars: int = 0
    sent_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def adapter(self) -> str:
        return self.req.version.internal if self.req.version is not None else BASE_NAME


def _pick_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_dtype(dtype, device: torch.device) -> torch.dtype:
    """bf16 on accelerators; fp32 on CPU (bf16 matmuls are many times slower on CPUs without it)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, {"half": "float16", "float": "float32", "bf16": "bfloat16"}.get(dtype, dtype), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype (try 'float32', 'bfloat16', 'float16')")
        return value
    return dtype


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
        device, dtype: default CUDA with bf16 when available, else CPU with fp32.
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
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        self.model = models.load(base, dtype=self.dtype).to(self.device).eval()
        self.packed_linears = self._pack(pack_weights, max_num_seqs)
        self.fused_norms = norms.fuse_rms_norms(self.model) if self.dtype == torch.float32 else 0
        self.tokenizer = models.load_tokenizer(base)
        self.base_name = served_name or (models.DEFAULT if base == models.DEFAULT else Path(os.fspath(base)).name)
        cfg = self.model.config
        self._vocab = self.model.get_input_embeddings().num_embeddings   # before adapters wrap the embedding
        limit = getattr(cfg, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        self.max_model_len = min(limit, max_model_len or DEFAULT_MAX_MODEL_LEN)
        self.max_num_seqs, self.max_waiting, self.max_prefill_tokens = max_num_seqs, max_waiting, max_prefill_tokens
        self.cache = _make_cache(cfg, max_num_seqs, self.max_model_len, self.dtype, self.device)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.pool = AdapterPool(self.model, max_loras, max_cpu_loras, max_lora_rank)
        self._eos = set(_eos_ids(self.tokenizer, self.model))
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos, default=0)
        self._model_lock = threading.RLock()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Seq] = []
        self._requests: dict[str, _Request] = {}
        self._thread: threading.Thread | None = None
        self._route: tuple | None = None        # (row adapter names, slot tensor) of the last mixed forward
        self._stopping = False
        self._ids = itertools.count()
        self._stats = dict(requests_total=0, requests_finished=0, tokens_generated_total=0, prompt_tokens_total=0,
                           steps_total=0, prefill_steps_total=0)

    def _pack(self, pack_weights: bool | None, rows: int) -> int:
        """Pack the bare base's linear weights for ``rows``-row GEMMs where that applies; how many."""
        fits = self.device.type == "cpu" and self.dtype == torch.float32 and packed.available()
        if pack_weights and not fits:
            raise ValueError(f"pack_weights=True needs a CPU float32 engine and a PyTorch built with MKL "
                             f"(here: device {self.device}, dtype {self.dtype}, MKL packed GEMM "
                             f"{'available' if packed.available() else 'missing'})")
        return packed.pack_linears(self.model, rows) if fits and pack_weights is not False else 0

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, path, *, replace: bool = False) -> AdapterInfo:
        """Load the adapter directory ``path`` under ``name``, checked now (files, rank, fit to the base,
        mixability). ``replace=True`` makes a new version of an existing name (vLLM's load_inplace):
        requests already submitted finish on the version they started with.

        Raises:
            AdapterLoadError: why the adapter cannot be served; ``param`` names the request field.
        """
        if name == self.base_name:
            raise BadRequest(f"{name!r} is the base model's name; choose another adapter name", "lora_name")
        config, tensors = read_version_files(path)
        with self._model_lock, self._lock:
            v = self.pool.add(name, path, config, tensors, replace, self._busy())
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
        room = self.max_model_len - len(ids)
        if room < 1:
            raise PromptTooLong(len(ids), self.max_model_len)
        if params.max_tokens is not None and params.max_tokens > room:
            raise BadRequest(f"max_tokens={params.max_tokens} is too large: the prompt has {len(ids)} tokens and this "
                             f"model's maximum context length is {self.max_model_len} tokens, so at most {room} new "
                             "tokens fit", "max_tokens")
        with self._lock:
            if self._stopping:
                raise ServingError("the engine is shutting down")
            # Requests that free slots take at the next step are not "waiting": the bound must not
            # depend on whether the loop has admitted a burst yet.
            free = max(0, self.max_num_seqs - len(self._running))
            if bounded and len(self._waiting) >= self.max_waiting + free:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_waiting={self.max_waiting}); retry later")
            version = None
            if adapter is not None and adapter not in (self.base_name, BASE_NAME):
                version = self.pool.resolve(adapter)
            rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            if rid in self._requests:
                raise BadRequest(f"request_id {rid!r} is already running", "request_id")
            handle = RequestHandle(rid, len(ids), lambda: self._abort(rid))
            req = _Request(rid, text, ids, params, version, handle)
            max_new = min(params.max_tokens or room, room)
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                gen = None if params.greedy else make_generator(seed, self.device)
                req.seqs.append(_Seq(req, i, gen, max_new))
            if version is not None:
                version.refs += 1
            self._requests[rid] = req
            self._waiting.append(req)
            self._stats["requests_total"] += 1
            self._stats["prompt_tokens_total"] += len(ids)
            self._wake.notify_all()
        return handle

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("the prompt is empty", "prompt")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in prompt):
            vocab = self._vocab
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
            req = self._requests.get(request_id)
            if req is None:
                return
            req.aborted = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._complete(req)
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
            for req in list(self._requests.values()):
                req.aborted = True
            self._reap()
            for req in list(self._waiting):
                self._complete(req)
            self._waiting.clear()
            self._stopping = False   # usable again: generate() or start()

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
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
            for req in {s.req for s in self._running}:
                req.done = True
                self._release(req)
                req.handle._push([], error=error)
            self._running = []

    def _step(self) -> bool:
        """One round: reap aborted, admit waiting (one prefill), decode every running sequence."""
        with self._model_lock:
            with self._lock:
                self._reap()
                joined = self._admit()
                self._stats["steps_total"] += 1
            if joined:
                self._prefill(joined)
            if self._running:
                self._decode()
            return bool(joined or self._running)

    # -- admission -----------------------------------------------------------------------------
    def _busy(self) -> set:
        return {s.adapter for s in self._running}

    def _admit(self) -> list[_Seq]:
        joined: list[_Seq] = []
        longest = 0
        while self._waiting:
            req = self._waiting[0]
            n = len(req.seqs)
            if len(self._running) + n > self.max_num_seqs:
                break
            if joined and max(longest, len(req.prompt_ids)) * (len(joined) + n) > self.max_prefill_tokens:
                break   # the rest join at the next step
            if req.version is not None:
                try:
                    ok = self.pool.make_ready(req.version, self._busy())
                except ServingError as exc:
                    self._waiting.popleft()
                    req.done = True
                    self._release(req)
                    req.handle._push([], error=exc)
                    continue
                if not ok:
                    break   # every ready adapter is in use: wait for one to finish
            self._waiting.popleft()
            for s in req.seqs:
                s.row = len(self._running)
                self._running.append(s)
                joined.append(s)
            longest = max(longest, len(req.prompt_ids))
        return joined

    def _reap(self) -> None:
        """Aborted requests leave the batch (their slots are free for this step's admissions), and
        adapter versions no request uses any more leave the model."""
        for req in {s.req for s in self._running if s.req.aborted}:
            self._complete(req)
        self._compact()
        self.pool.collect()

    # -- forward passes ------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, names: list[str]):
        kwargs = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "use_cache": True,
                  "logits_to_keep": 1, self._cache_kw: self.cache}
        with torch.no_grad():
            if self.pool.peft is None:
                out = self.model(**kwargs)
            else:
                with self.pool.peft.applying(names):
                    self._keep_route(names)
                    out = self.model(**kwargs)
        return out.logits[:, -1].float()                                   # (B, V)

    def _keep_route(self, names: list[str]) -> None:
        """Route this call's rows with the previous call's slot tensor when the rows' adapters are
        the same: layers then reuse their gathered factors at once (``AdapterLayer.gathered``'s
        identity check, the path ``generate`` takes on every step) instead of re-checking their
        banks first. Safe here: a version's tensors never change while a request runs on it (a
        reload is a new version), and gathered factors are copies, untouched by other adapters
        being loaded or evicted."""
        adapter_set = self.pool.peft.adapter_set
        route = adapter_set.route()
        if not isinstance(route, torch.Tensor):
            return
        if self._route is not None and self._route[0] == names:
            adapter_set._route = (self._route[1],)
        else:
            self._route = (list(names), route)

    def _prefill(self, seqs: list[_Seq]) -> None:
        lengths = [len(s.req.prompt_ids) for s in seqs]
        T = max(lengths)
        ids = torch.full((len(seqs), T), self._pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - lengths[i]:] = torch.tensor(s.req.prompt_ids)
        offsets = torch.tensor([T - n for n in lengths])[:, None]
        positions = (torch.arange(T)[None, :] - offsets).clamp_min(0)      # (n, T)
        self._clean(T)
        self.cache.for_prefill(seqs[0].row, lengths, T)
        mask = prefill_mask(lengths, T, self.dtype, self.device)
        logits = self._forward(ids.to(self.device), positions.to(self.device), mask, [s.adapter for s in seqs])
        self._stats["prefill_steps_total"] += 1
        for s, n in zip(seqs, lengths):
            s.pos = n
        self._advance(seqs, logits)

    def _decode(self) -> None:
        seqs = self._running
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = torch.tensor([s.pos for s in seqs], device=self.device)
        length = max(s.pos for s in seqs) + 1
        self._clean(length)
        self.cache.for_decode(pos, length)
        logits = self._forward(ids, pos[:, None], decode_mask(pos, length, self.dtype), [s.adapter for s in seqs])
        for s in seqs:
            s.pos += 1
        self._advance(seqs, logits)

    def _clean(self, length: int) -> None:
        """Zero cache positions before anything is written or read there (in chunks, so not every step)."""
        self.cache.ensure_clean(min(-(-length // CLEAN_CHUNK) * CLEAN_CHUNK, self.cache.max_len))

    # -- after a forward -----------------------------------------------------------------------
    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample each row's token, stream the deltas, complete finished requests, compact the batch."""
        for row, s in enumerate(seqs):
            if len(s.tokens) < s.req.params.min_tokens:
                logits[row, self._banned(s.req.params)] = float("-inf")
        tokens = sample(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        with self._lock:
            outbox: dict[_Request, list[StreamDelta]] = {}
            for s, token in zip(seqs, tokens):
                outbox.setdefault(s.req, []).append(self._append(s, token))
            self._stats["tokens_generated_total"] += len(seqs)
            for req, deltas in outbox.items():
                if all(s.finish_reason is not None for s in req.seqs):
                    self._complete(req, deltas)
                else:
                    req.handle._push(deltas)
            self._compact()

    def _banned(self, params: SamplingParams) -> list[int]:
        """Tokens that would end a completion (masked before ``min_tokens``)."""
        return sorted(set(params.stop_token_ids) | self._eos)

    def _append(self, s: _Seq, token: int) -> StreamDelta:
        """Add ``token`` to ``s``, decide whether it finished, and return the delta to stream."""
        p = s.req.params
        s.tokens.append(token)
        if token in p.stop_token_ids:
            s.finish_reason, s.stop_reason = "stop", token
        elif token in self._eos and not p.ignore_eos:
            s.finish_reason = "stop"
        text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
        if s.finish_reason is None and p.stop_list:
            cut, hit = _find_stop(text, p.stop_list, max(0, s.sent_chars - max(map(len, p.stop_list))))
            if hit is not None:
                text, s.finish_reason, s.stop_reason = text[:cut], "stop", hit
        if s.finish_reason is None and len(s.tokens) >= s.max_new:
            s.finish_reason = "length"
        s.text = text
        safe = len(text) if s.finish_reason is not None else _safe_length(text, p.stop_list)
        delta_text = text[s.sent_chars:safe] if safe > s.sent_chars else ""
        new_tokens = s.tokens[s.sent_tokens:]
        s.sent_chars, s.sent_tokens = max(s.sent_chars, safe), len(s.tokens)
        return StreamDelta(s.index, delta_text, new_tokens, s.finish_reason, len(s.req.prompt_ids), len(s.tokens))

    def _compact(self) -> None:
        """Finished sequences leave the batch; the last row moves into each freed slot, so the
        running rows stay ``0 .. B-1`` (the cache's decode view needs no gather)."""
        for row in range(len(self._running) - 1, -1, -1):
            s = self._running[row]
            if s.finish_reason is None:
                continue
            last = self._running[-1]
            if last is not s:
                self.cache.move(last.row, s.row, last.pos)
                last.row, self._running[row] = s.row, last
            self._running.pop()
            s.row = -1

    def _complete(self, req: _Request, deltas: list[StreamDelta] = ()) -> None:
        """Hand ``req``'s last deltas and its output to its handle; unpin its adapter version.
        A sequence ended without a token of its own (aborted) gets an empty closing delta."""
        if req.done:
            return
        req.done = True
        deltas = list(deltas)
        closed = {d.index for d in deltas if d.finish_reason is not None}
        for s in req.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
            if s.finish_reason == "abort" and s.index not in closed:
                deltas.append(StreamDelta(s.index, "", [], "abort", len(req.prompt_ids), len(s.tokens)))
        outputs = [CompletionOutput(s.index, s.text, list(s.tokens), s.finish_reason, stop_reason=s.stop_reason)
                   for s in req.seqs]
        self._release(req)
        self._stats["requests_finished"] += 1
        req.handle._push(deltas, output=RequestOutput(req.id, req.prompt, req.prompt_ids, outputs))

    def _release(self, req: _Request) -> None:
        """Forget ``req``; its adapter version may retire (dropped from the model at the next step)."""
        self._requests.pop(req.id, None)
        if req.version is not None:
            req.version.refs -= 1

    # -- figures -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters for /metrics: running and waiting sequences/requests, adapters per tier, totals."""
        with self._lock:
            states = [self.pool.state(v) for v in self.pool.current.values()]
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "adapters_ready": states.count("ready"), "adapters_cpu": states.count("cpu"),
                    "adapters_disk": states.count("disk"), "kv_cache_bytes": self.cache.nbytes,
                    "max_num_seqs": self.max_num_seqs, **self._stats}


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str | None]:
    """Earliest stop string in ``text`` at or after ``start``: (its index, it), or (len, None)."""
    best, hit = len(text), None
    for stop in stops:
        i = text.find(stop, start)
        if i != -1 and i < best:
            best, hit = i, stop
    return best, hit


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` may be streamed: not a trailing partial character (U+FFFD from an
    incomplete byte sequence) nor a trailing prefix of a stop string, which may yet complete."""
    end = len(text.rstrip("\ufffd"))
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                held = max(held, k)
                break
    return end - held


def _eos_ids(tokenizer, model) -> list[int]:
    from deltatune.training.evaluate import stop_token_ids

    return stop_token_ids(tokenizer, model)


def _make_cache(cfg, slots: int, max_len: int, dtype, device) -> SlotKVCache:
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return SlotKVCache(cfg.num_hidden_layers, slots, kv_heads, max_len, head_dim, dtype, device)
