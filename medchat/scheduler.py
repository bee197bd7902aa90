"""One loop per model in memory that batches the decode steps of every request on it: a small,
fair scheduler for a handful of users, not a serving engine.

    loop = ModelLoop(model, device="cpu", name="base")
    loop.submit(Job(stream, prompt_ids, adapter, settings, stop_ids, stop_strings, tokenizer))
    loop.call(fn)             # run fn between two steps (e.g. attach an adapter), return its result

Each iteration of the loop thread:
  1. ends the rows whose request was cancelled (Stop, a client gone) before computing anything
     more for them, so a cancel takes effect within one step;
  2. when it has nothing running, prefills the waiting requests itself, up to a prompt-token
     budget, so the first requests start in one batch;
  3. joins the rows its prefill threads made ready: while the loop decodes, new requests are
     prefilled beside it, each alone (its first token is then exactly what a solo run
     computes), on another forward-pass slot, and their KV caches merged into the batch's;
     the batch never stops for a newcomer's prompt;
  4. runs ONE decode step for all running rows together: one forward pass, each row routed to
     its own adapter (medchat.lora_routing.use_adapters), each row sampled with its own settings
     and generator (medchat.sampling), each row checked for its own stop conditions and
     streamed as text; finished rows leave the batch.
New requests therefore join between steps and nobody waits for whole other answers. The loops
of different models (the base and a merged model, say) and their prefill threads share the
device's forward-pass slots first come first served: on a CPU as many passes at once as
torch's threads fit in the cores, so they neither fight over the same cores nor leave one
idle. Changes to a model's modules (`call`: attaching an adapter that wraps layers, deleting
one) wait for the step and the prefills under way and run with nothing else on the model.

The batch's KV cache is transformers' DynamicCache, one tensor per layer holding every row,
left-padded: when a row joins, the shorter side is padded on the left (masked out by the
attention mask; positions are passed explicitly per row), and when rows leave they are dropped
and columns that became padding for every row are trimmed. A model whose cache is not plain
full-attention layers (sliding-window or hybrid models) cannot be merged that way: its loop
runs one request at a time, and says so in the log.

The threads end after a while without work (and at once when their model is evicted and
idle); a later request starts them again.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from medchat import lora_routing
from medchat.backend import GenerationSettings, Stream
from medchat.sampling import Detokenizer, RowSampler, StopText

__all__ = ["GiveWay", "Job", "ModelLoop", "SchedulerConfig", "wait_for_a_quiet_moment"]

log = logging.getLogger(__name__)


class _TakeTurns:
    """First come, first served slots for forward passes, shared by every model loop of the
    process on one device. On a CPU there are as many slots as torch's intra-op threads fit in
    the cores (one with torch's default of a thread per core: loops running at once would
    fight over the same cores; two with one thread each on two cores); on a GPU one (the
    passes queue on the device anyway). A loop that frees its slot cannot take it straight back
    while another one waits."""

    def __init__(self, device: str):
        self.device = device
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._running = 0
        self._slots: int | None = None
        self._last_pass = 0.0  # time.monotonic() when a pass last ended

    def slots(self) -> int:
        if self._slots is None:  # decided at the first pass: torch's threads are set by then
            import os

            import torch

            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else (os.cpu_count() or 1)
            self._slots = (max(1, cores // max(1, torch.get_num_threads()))
                           if self.device == "cpu" else 1)
        return self._slots

    def __enter__(self) -> None:
        me = object()
        slots = self.slots()
        with self._cond:
            self._queue.append(me)
            while self._queue[0] is not me or self._running >= slots:
                self._cond.wait()
            self._queue.popleft()
            self._running += 1
            self._cond.notify_all()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._running -= 1
            self._last_pass = time.monotonic()
            self._cond.notify_all()

    def wait_for_no_pass(self, until: float) -> None:
        """Return once no forward pass runs or waits on this device, or at `until`
        (time.monotonic()) at the latest."""
        with self._cond:
            while self._running or self._queue:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def quiet_for(self) -> float:
        """Seconds since the last forward pass on this device ended (0 while one runs or
        waits)."""
        with self._cond:
            if self._running or self._queue:
                return 0.0
            return time.monotonic() - self._last_pass


_TURNS: dict[str, _TakeTurns] = {}  # device -> its slots
_TURNS_LOCK = threading.Lock()


def _turns(device: str) -> _TakeTurns:
    with _TURNS_LOCK:
        return _TURNS.setdefault(str(device), _TakeTurns(str(device)))


def wait_for_a_quiet_moment(device: str, quiet_s: float = 0.02, at_most_s: float = 0.5) -> float:
    """Wait until no forward pass has run on `device` for `quiet_s` (a request being answered
    keeps its passes back to back), or `at_most_s` at the latest; returns the seconds waited.
    Model loads and adapter attaches call it before their Python-heavy part, which holds the
    interpreter in turns with every pass of every loop: a short request then runs first, and
    a long answer delays the load by `at_most_s` only."""
    turns = _turns(device)
    start = time.monotonic()
    while time.monotonic() - start < at_most_s:
        if turns.quiet_for() >= quiet_s:
            break
        time.sleep(0.005)
    return time.monotonic() - start


class GiveWay:
    """Background work done in small pieces (attaching an adapter layer by layer) that gives
    way to forward passes: `start()` waits for a quiet moment (wait_for_a_quiet_moment), and
    `between()`, called between two pieces, waits while a pass runs or waits on the device,
    so a request that arrives in the middle of the work has its passes run without sharing the
    interpreter with the work. Both wait only within one budget (`at_most_s` from the start):
    while answers run back to back (a long answer), the work goes on after that as it would
    without giving way, and finishes at most `at_most_s` later."""

    def __init__(self, device: str, at_most_s: float = 0.5, quiet_s: float = 0.02):
        self.device, self.quiet_s = device, quiet_s
        self.deadline = time.monotonic() + at_most_s

    def start(self) -> float:
        """Wait for a quiet moment within the budget; returns the seconds waited."""
        return wait_for_a_quiet_moment(self.device, self.quiet_s,
                                       max(0.0, self.deadline - time.monotonic()))

    def between(self) -> None:
        """Wait while a forward pass runs or waits on the device (within the budget)."""
        if time.monotonic() < self.deadline:
            _turns(self.device).wait_for_no_pass(self.deadline)


@dataclass(frozen=True)
class SchedulerConfig:
    """How a model's loop shares its steps."""

    max_rows: int = 32  # rows decoded together; more requests wait to join
    prefill_tokens: int = 512  # prompt tokens an idle loop prefills before its first step
    idle_exit_s: float = 30.0  # the loop's threads end after this long without work
    # threads that prefill new requests while the loop decodes the running ones, so a
    # new request does not hold up the batch (None: one per forward-pass slot of the device: on
    # a CPU the cores over torch's threads per pass, on a GPU one; 0: the loop prefills itself,
    # between its steps)
    prefill_threads: int | None = None


@dataclass
class Job:
    """One request as its model's loop sees it."""

    stream: Stream
    prompt: list[int]
    adapter: str | None  # routing name of the adapter (None: the model itself)
    settings: GenerationSettings  # checked; a seed chosen when sampling
    stop_ids: frozenset[int]  # tokens that end the answer (not shown)
    stop_strings: tuple[str, ...]  # strings that end the answer (not shown)
    tokenizer: Any


@dataclass
class _Row:
    """A running job: its tokens so far and how to continue them."""

    job: Job
    sampler: RowSampler
    detok: Detokenizer
    stop_text: StopText
    tokens: list[int]  # prompt + answer so far; the last one not yet fed to the model
    new: int = 0  # answer tokens so far
    done: str | None = None  # finish reason once decided

    @property
    def stream(self) -> Stream:
        return self.job.stream


@dataclass
class _Prefilled:
    """A prefilled row waiting to join the batch, with its own cache."""

    row: _Row
    cache: Any
    mask: Any


class _Gate:
    """Forward passes on one model (shared: the decode step and prefills run side by side)
    against changes to its modules (exclusive). A waiting change goes first: it waits for the
    passes under way, and none starts meanwhile."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self.owner: threading.Thread | None = None  # the thread holding it exclusively

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    def acquire_exclusive(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
                self._exclusive, self.owner = True, threading.current_thread()
                return True
            finally:
                self._waiting -= 1
                self._cond.notify_all()

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive, self.owner = False, None
            self._cond.notify_all()


class ModelLoop:
    """The decode loop of one model (see the module docstring)."""

    def __init__(self, model: Any, device: str, name: str = "",
                 config: SchedulerConfig | None = None):
        self.model = model
        self.device = device
        self.name = name
        self.config = config or SchedulerConfig()
        self._turns = _turns(device)  # forward passes of all loops on this device
        helpers = self.config.prefill_threads
        self._helpers_max = self._turns.slots() if helpers is None else max(0, int(helpers))
        self._cond = threading.Condition()
        self._gate = _Gate()
        self._pending: deque[Job] = deque()
        self._prefilling: list[Job] = []  # taken by a prefill thread, not ready yet
        self._ready: list[_Prefilled] = []  # prefilled by a helper, joining at the next step
        self._thread: threading.Thread | None = None  # the decode loop
        self._helpers: list[threading.Thread] = []  # prefill threads running
        self._retired = False
        self._rows: list[_Row] = []  # loop thread only (others read its length)
        self._cache = None  # the batch's DynamicCache (loop thread only)
        self._mask = None  # [rows, columns] 1 = a real token, 0 = padding
        self._serial = _layout_problem(model)  # why this model runs one request at a time
        if self._serial:
            log.warning("%s: %s; its requests run one at a time", name, self._serial)
        self._cache_kw = _cache_keyword(model)
        self._keep_kw = "logits_to_keep" in _forward_params(model)
        self._to_delete: dict[str, Callable[[], bool]] = {}  # adapter -> delete once unused
        # counters for tests and benchmarks; *_s: seconds spent in prefills, decode forward
        # passes, and choosing/streaming the rows' tokens; helper_prefills: prefills a
        # helper thread ran while the loop decoded
        self.stats = {"steps": 0, "max_rows": 0, "prefills": 0, "rows_stepped": 0,
                      "prefill_s": 0.0, "forward_s": 0.0, "rows_s": 0.0, "helper_prefills": 0}
        self._stats_lock = threading.Lock()

    # -- what other threads call -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a request; it joins the batch before a next step."""
        with self._cond:
            self._pending.append(job)
            self._wake()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn` between two decode steps, with no prefill under way (nothing runs on the
        model meanwhile) and return its result (or raise its error)."""
        if self._gate.owner is threading.current_thread():
            return fn()
        if not self._gate.acquire_exclusive(timeout):
            raise TimeoutError(f"{self.name}: the model's loop did not run the change in time")
        try:
            return fn()
        finally:
            self._gate.release_exclusive()

    def delete_adapter_when_unused(self, name: str, delete: Callable[[], bool]) -> None:
        """Call `delete()` between two steps once no running or waiting request uses adapter
        `name` (a retrained run's old weights: its running answers finish with them); `delete`
        returns False when it cannot run yet (it is tried again a little later)."""
        with self._cond:
            self._to_delete[name] = delete
            self._wake()

    def retire(self) -> None:
        """The model left the cache: end the threads once their work is done."""
        with self._cond:
            self._retired = True
            self._cond.notify_all()

    def busy(self) -> int:
        """Requests running or waiting on this model."""
        with self._cond:
            return (len(self._rows) + len(self._ready) + len(self._prefilling)
                    + len(self._pending))

    def _wake(self) -> None:  # with self._cond held
        self._retired = False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"medchat-loop-{self.name}",
                                             daemon=True)
            self._thread.start()
        if self._pending and len(self._helpers) < min(self._helpers_max, len(self._pending)):
            helper = threading.Thread(target=self._help, daemon=True,
                                      name=f"medchat-prefill-{self.name}-{len(self._helpers)}")
            self._helpers.append(helper)
            helper.start()
        self._cond.notify_all()

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                self.stats[key] += value

    # -- the loop ------------------------------------------------------------------------------

    def _idle(self) -> bool:  # with self._cond held: nothing running, joining or prefilling
        return not (self._rows or self._ready or self._prefilling)

    def _prefills_itself(self) -> bool:  # with self._cond held
        """The loop prefills what waits: when it has nothing else to do (the first requests
        then start in one batch), or always when it has no prefill threads."""
        return self._idle() or not self._helpers_max

    def _loop_work(self) -> bool:  # with self._cond held
        return bool(self._rows or self._ready or self._to_delete
                    or self._pending and self._prefills_itself())

    def _run(self) -> None:
        import torch

        while True:
            with self._cond:
                while not self._loop_work():
                    if self._pending or self._prefilling:  # helpers prefill: they notify
                        self._cond.wait(self.config.idle_exit_s)
                    elif self._retired or not self._cond.wait(self.config.idle_exit_s):
                        if not (self._loop_work() or self._pending or self._prefilling):
                            self._thread = None
                            return
                deleting = bool(self._to_delete)
            if deleting and self._delete_unused() and not (self._rows or self._ready):
                with self._cond:  # in use by a request being prefilled, or an attach under
                    self._cond.wait(0.05)  # way: look again shortly (or when woken)
            with self._gate.shared():
                try:
                    with torch.inference_mode():
                        self._iterate()
                except BaseException as e:  # a failed step: fail its rows, keep serving
                    log.exception("%s: decode step failed", self.name)
                    for row in self._rows:
                        row.stream.fail(e)
                    self._rows, self._cache, self._mask = [], None, None

    def _iterate(self) -> None:
        """One turn of the loop (the model shared with the prefill threads): end cancelled
        rows; prefill what waits if the loop does (see _prefills_itself); join the rows the
        prefill threads made ready; one decode step for every row."""
        self._drop([r for r in self._rows if r.stream.cancelled], "cancelled")
        with self._cond:
            admit = self._take_pending() if self._prefills_itself() else []
            self._prefilling.extend(admit)
            if self._pending:
                self._cond.notify_all()  # the rest: prefill threads, beside these
        for i, job in enumerate(admit):
            done = self._prefill(job)
            with self._cond:
                self._prefilling = [j for j in self._prefilling if j is not job]
                if done is False:  # this model runs one request at a time: wait
                    rest = admit[i + 1:]
                    self._prefilling = [j for j in self._prefilling
                                        if not any(j is r for r in rest)]
                    self._pending.extendleft(reversed([job] + rest))
                    break
            if done:
                self._join(done)
        with self._cond:
            ready, self._ready = self._ready, []
        for item in ready:
            if item.row.stream.cancelled:
                self._end(item.row, "cancelled")
            else:
                self._join(item)
        if self._rows:
            self._step()
        with self._cond:
            self._cond.notify_all()  # prefill threads may wait for room

    def _help(self) -> None:
        """A prefill thread: prefills waiting requests one at a time while the loop decodes,
        and hands them to the loop."""
        import torch

        me = threading.current_thread()
        while True:
            with self._cond:
                while not (self._pending and self._room() > 0 and not self._prefills_itself()):
                    if self._pending:  # the loop takes them, or there is no room yet
                        self._cond.wait(self.config.idle_exit_s)
                    elif self._retired or not self._cond.wait(self.config.idle_exit_s):
                        if not self._pending:
                            self._helpers.remove(me)
                            return
                job = self._pending.popleft()
                if job.stream.cancelled:
                    job.stream.finish("cancelled", 0)
                    continue
                self._prefilling.append(job)
            done = None
            try:
                with self._gate.shared(), torch.inference_mode():
                    done = self._prefill(job)
            finally:
                with self._cond:
                    self._prefilling = [j for j in self._prefilling if j is not job]
                    if done is False:
                        self._pending.appendleft(job)
                    elif done:
                        self._ready.append(done)
                        self._count(helper_prefills=1)
                    self._wake()

    def _room(self) -> int:  # with self._cond held
        used = len(self._rows) + len(self._ready) + len(self._prefilling)
        if self._serial:
            return 0 if used else 1
        return self.config.max_rows - used

    def _delete_unused(self) -> bool:
        """Run the deletions whose adapter no request uses any more, with nothing running on
        the model; True while some must wait (in use, or `delete` could not run yet)."""
        def unused() -> list[str]:  # with self._cond held
            used = ({r.job.adapter for r in self._rows}
                    | {p.row.job.adapter for p in self._ready}
                    | {j.adapter for j in self._prefilling}
                    | {j.adapter for j in self._pending})
            return [n for n in self._to_delete if n not in used]

        with self._cond:  # the gate only when there is something to delete
            if not unused():
                return True
        self._gate.acquire_exclusive()
        try:
            with self._cond:
                deletions = [(n, self._to_delete.pop(n)) for n in unused()]
            for name, delete in deletions:
                try:
                    if not delete():
                        with self._cond:
                            self._to_delete.setdefault(name, delete)
                except Exception:  # the old weights stay; nothing routes to them any more
                    log.exception("%s: could not delete adapter %s", self.name, name)
        finally:
            self._gate.release_exclusive()
        with self._cond:
            return bool(self._to_delete)

    def _take_pending(self) -> list[Job]:
        """Waiting jobs the idle loop prefills itself (with self._cond held): FIFO, up to the
        row limit and the prompt-token budget; cancelled ones end here."""
        for job in [j for j in self._pending if j.stream.cancelled]:
            self._pending.remove(job)
            job.stream.finish("cancelled", 0)
        room = self._room()
        out: list[Job] = []
        budget = self.config.prefill_tokens
        while self._pending and len(out) < room:
            job = self._pending[0]
            if out and len(job.prompt) > budget:
                break
            budget -= len(job.prompt)
            out.append(self._pending.popleft())
        return out

    # -- prefill -------------------------------------------------------------------------------

    def _forward(self, input_ids, mask, positions, cache, adapters, last_only: bool):
        kwargs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                  self._cache_kw: cache, "use_cache": True}
        if last_only and self._keep_kw:
            kwargs["logits_to_keep"] = 1
        with self._turns, lora_routing.use_adapters(adapters):
            out = self.model(**kwargs)
        return out.logits[:, -1, :].float()

    def _prefill(self, job: Job) -> _Prefilled | bool | None:
        """Prefill `job` and choose its first token. Returns the row to join the batch; None
        when it ended already (or failed alone); False when it must wait (the model's cache
        turned out not to merge and another request is running)."""
        import torch

        stream = job.stream
        try:
            ids = torch.tensor([job.prompt], device=self.device)
            mask = torch.ones_like(ids)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            cache = _new_cache(self.model)
            t0 = time.perf_counter()
            logits = self._forward(ids, mask, positions, cache, [job.adapter], last_only=True)
            self._count(prefill_s=time.perf_counter() - t0, prefills=1)
            reason = _unmergeable(cache)
            with self._cond:
                if reason and not self._serial:
                    self._serial = reason
                    log.warning("%s: %s; its requests run one at a time", self.name, reason)
                if self._serial and (self._rows or self._ready or len(self._prefilling) > 1):
                    return False  # found out now: wait for the running request
            row = _Row(job, RowSampler(job.settings, self.device), Detokenizer(job.tokenizer),
                       StopText(job.stop_strings), list(job.prompt))
            self._advance(row, logits[0])
        except BaseException as e:  # this request fails alone
            log.exception("%s: prefill of request %s failed", self.name, stream.id)
            stream.fail(e)
            return None
        if row.done:
            self._end(row)
            return None
        return _Prefilled(row, cache, mask)

    def _join(self, item: _Prefilled) -> None:
        """Merge a prefilled row's cache into the batch's (left-padding the shorter side)."""
        import torch
        import torch.nn.functional as F

        row, cache, mask = item.row, item.cache, item.mask
        if not self._rows:
            self._rows, self._cache, self._mask = [row], cache, mask
            return
        width, new = self._mask.shape[1], mask.shape[1]
        total = max(width, new)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a = F.pad(getattr(mine, attr), (0, 0, total - width, 0))
                b = F.pad(getattr(theirs, attr), (0, 0, total - new, 0))
                setattr(mine, attr, torch.cat([a, b], dim=0))
        self._mask = torch.cat([F.pad(self._mask, (total - width, 0)),
                                F.pad(mask, (total - new, 0))], dim=0)
        self._rows = self._rows + [row]  # a new list: other threads read its length

    # -- decode --------------------------------------------------------------------------------

    def _step(self) -> None:
        import torch

        rows = self._rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[len(r.tokens) - 1] for r in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        t0 = time.perf_counter()
        logits = self._forward(ids, self._mask, positions, self._cache,
                               [r.job.adapter for r in rows], last_only=False)
        t1 = time.perf_counter()
        for i, row in enumerate(rows):
            try:
                self._advance(row, logits[i])
            except BaseException as e:  # a row's sampling or decoding failed: that row ends
                log.exception("%s: request %s failed", self.name, row.stream.id)
                row.done = "error"
                row.stream.fail(e)
        self._drop([r for r in rows if r.done], None)
        with self._stats_lock:
            stats = self.stats
            stats["forward_s"] += t1 - t0
            stats["steps"] += 1
            stats["rows_stepped"] += len(rows)
            stats["max_rows"] = max(stats["max_rows"], len(rows))
            stats["rows_s"] += time.perf_counter() - t1

    def _advance(self, row: _Row, logits) -> None:
        """Choose the row's next token from its logits and stream what it adds."""
        import torch

        job = row.job
        history = (torch.tensor(row.tokens, device=self.device)
                   if row.sampler.needs_history else None)
        token = row.sampler.next_token(logits, history)
        row.new += 1
        row.stream.new_tokens = row.new
        if token in job.stop_ids:
            row.done = "stop"
            return
        row.tokens.append(token)
        text, hit = row.stop_text.feed(row.detok.add(token))
        row.stream.put(text)
        if hit:
            row.done = "stop"
        elif row.new >= job.settings.max_new_tokens:
            row.done = "length"

    def _end(self, row: _Row, reason: str | None = None) -> None:
        reason = reason or row.done
        if reason == "error":
            return  # already failed
        if not row.stop_text.hit:
            # ended another way than a stop string: show a cut character and held-back text
            text, hit = row.stop_text.feed(row.detok.flush())
            row.stream.put(text)
            if not hit:
                row.stream.put(row.stop_text.rest())
        row.stream.finish(reason, row.new)

    def _drop(self, leaving: list[_Row], reason: str | None) -> None:
        """End `leaving` rows and take them out of the batch and its cache."""
        if not leaving:
            return
        import torch

        gone = {id(r) for r in leaving}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        for row in leaving:
            self._end(row, reason)
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        used = torch.nonzero(mask.any(dim=0))
        first = int(used[0]) if len(used) else 0  # columns before it are padding for every row
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]


# -- helpers -------------------------------------------------------------------------------------

def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _cache_keyword(model: Any) -> str:
    """transformers >= 5.x names the cache argument `cache`; earlier ones `past_key_values`."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _new_cache(model: Any):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _layout_problem(model: Any) -> str | None:
    """What the model's config says about its cache layers (None: plain full attention, or
    unknown until the first prefill)."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(_new_cache(model), "layers", None) or []:
        if type(layer) is not DynamicLayer:
            return f"its cache has {type(layer).__name__} layers (sliding-window or hybrid)"
    return None


def _unmergeable(cache: Any) -> str | None:
    """Why a prefilled cache cannot be merged with others row by row, or None."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if type(cache) is not DynamicCache:
        return f"its cache is a {type(cache).__name__}, not a plain DynamicCache"
    layers = getattr(cache, "layers", None)
    if not layers:
        return "its cache has no per-layer tensors"
    for layer in layers:
        if type(layer) is not DynamicLayer:
            return f"its cache has {type(layer).__name__} layers (sliding-window or hybrid)"
        if getattr(layer, "keys", None) is None or layer.keys.dim() != 4:
            return "its cache has layers without key/value tensors"
    return None

