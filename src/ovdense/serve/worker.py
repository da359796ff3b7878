"""The model worker: one thread (`ModelWorker`) runs the models. Requests decode their image in their own thread and
queue for it, and the segmentation requests that wait together run as one batch through the image encoder."""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..text import Vocabulary

BATCH_PIXELS = 4_000_000  # a batch takes along images while their pixels stay under this (a larger one runs alone)


@dataclass(eq=False)
class _Job:
    """Model work: work() alone, or, with `rgb`, work(SegmentationResult of rgb, vocabulary and overrides)."""

    future: Future
    work: Callable
    rgb: np.ndarray | None = None
    vocabulary: Vocabulary | None = None
    overrides: dict | None = None

    @property
    def pixels(self) -> int:
        return self.rgb.shape[0] * self.rgb.shape[1]

    def joins(self, first: _Job) -> bool:
        """Whether this job can run in the segmentation batch that `first` starts."""
        return self.rgb is not None and self.overrides == first.overrides


class ModelWorker:
    """The one thread that runs the models, taking jobs in arrival order. A segmentation job takes along the other
    segmentation jobs waiting with the same options (ahead of any other work) into one `predict_batch` of at most
    `batch` images and BATCH_PIXELS pixels; other work runs alone. A job cancelled before its turn leaves the line
    at once.

    own_thread: start a thread for `run` at the first job; False: the caller runs `run` itself, best in the thread
    that loaded the model (libgomp keeps a thread pool per calling thread; a second pool on few cores makes every
    small torch operation wait for a sleeping thread: 3x slower on 2 cores)."""

    def __init__(self, predictor, batch: int, own_thread: bool = True):
        if batch < 1:
            raise UsageError(f"batch must be at least 1, got {batch}")
        self.predictor, self.batch, self.own_thread = predictor, batch, own_thread
        self.pending: deque[_Job | None] = deque()  # None: stop
        self.ready = threading.Condition()
        self.thread: threading.Thread | None = None

    def segment(self, rgb, vocabulary, overrides: dict, finish) -> Future:
        """A future finish(SegmentationResult of (H, W, 3) uint8 `rgb`), finish run on the worker's thread;
        overrides: Protocol fields for `predict`."""
        return self._submit(_Job(Future(), finish, rgb, vocabulary, overrides))

    def call(self, work) -> Future:
        """A future of work(), run alone on the worker's thread."""
        return self._submit(_Job(Future(), work))

    def run(self) -> None:
        """Run jobs in the calling thread until `close`."""
        while (group := self._next()) is not None:
            group = [job for job in group if job.future.set_running_or_notify_cancel()]
            try:
                if group and group[0].rgb is None:
                    _settle(group[0].future, group[0].work)
                elif group:
                    self._segment(group)
            except BaseException as error:  # SystemExit, KeyboardInterrupt: no request is left waiting for ever
                with self.ready:
                    if self.thread is threading.current_thread():  # this thread ends: the next job starts another
                        self.thread = None
                        if self.pending:
                            self._start()
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(error)
                raise

    def close(self) -> None:
        """Finish the jobs already queued, then stop `run`."""
        with self.ready:
            if self.own_thread and not self._running():
                return
            self.pending.append(None)
            self.ready.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="ovdense-model", daemon=True)
        self.thread.start()

    def _next(self) -> list[_Job] | None:
        """The next job and, for segmentation, the jobs it takes along; None when closed."""
        with self.ready:
            while not self.pending:
                self.ready.wait()
            first = self.pending.popleft()
            if first is None:
                return None
            group = [first]
            if first.rgb is None:
                return group
            pixels = first.pixels
            for job in list(self.pending):
                if len(group) == self.batch:
                    break
                if job is not None and job.joins(first):
                    if pixels + job.pixels > BATCH_PIXELS:
                        break
                    pixels += job.pixels
                    group.append(job)
                    self.pending.remove(job)
            return group

    def _submit(self, job: _Job) -> Future:
        job.future.add_done_callback(lambda future: self._forget(job) if future.cancelled() else None)
        with self.ready:
            if self.own_thread and not self._running():
                self._start()
            self.pending.append(job)
            self.ready.notify()
        return job.future

    def _forget(self, job: _Job) -> None:
        """A cancelled job leaves the line (and its image the memory) at once."""
        with self.ready:
            if job in self.pending:
                self.pending.remove(job)

    def _segment(self, group: list[_Job]) -> None:
        overrides = group[0].overrides
        try:
            results = self.predictor.predict_batch([job.rgb for job in group], [job.vocabulary for job in group],
                                                   **overrides)
        except Exception as error:  # noqa: BLE001 (any error is the request's answer, never the worker's end)
            if len(group) == 1:
                group[0].future.set_exception(error)
                return
            for job in group:  # one bad job must not fail the others: each alone
                _settle(job.future, self._segment_alone, job)
            return
        for job, result in zip(group, results):
            _settle(job.future, job.work, result)

    def _segment_alone(self, job: _Job):
        """job.work(SegmentationResult of its image, as a batch of one)."""
        return job.work(self.predictor.predict_batch([job.rgb], [job.vocabulary], **job.overrides)[0])


def _settle(future: Future, work, *args) -> None:
    """Settle `future` with work(*args)'s result, or with the exception it raises."""
    try:
        future.set_result(work(*args))
    except Exception as error:  # noqa: BLE001 (any error is the request's answer, never the worker's end)
        future.set_exception(error)
