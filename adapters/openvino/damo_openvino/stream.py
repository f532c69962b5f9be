"""Batched inference that is easy on memory: stream any iterable through OpenVINO.

:func:`infer_stream` pushes items through an ``AsyncInferQueue`` and yields the outputs in
input order. Memory stays flat however many items flow through, because

* at most ``max_in_flight`` requests run at once, and at most that many finished results
  wait to be yielded: item ``i`` is submitted only once item ``i - max_in_flight`` has been
  handed to the caller;
* each request keeps its input tensors for its whole life — the queue copies the next item
  into them (``share_inputs=False``) instead of allocating new ones;
* the input iterable is consumed lazily (one item per submission), so a generator reading
  images from disk never has more than ``max_in_flight`` of them decoded.

A result is a list of numpy arrays (one per model output) copied out of the request, since
the request's own output buffers are overwritten by its next job.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np


def infer_stream(
    compiled: Any,
    items: Iterable[Any],
    *,
    max_in_flight: int | None = None,
) -> Iterator[list[np.ndarray]]:
    """Yield ``[output0, output1, ...]`` for each item of ``items``, in order.

    ``compiled`` is an ``openvino.CompiledModel``; an item is one array (single-input
    models) or a sequence of arrays, one per input. ``max_in_flight`` defaults to the
    device's optimal number of infer requests.
    """
    import openvino as ov

    if max_in_flight is None:
        try:
            max_in_flight = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        except Exception:
            max_in_flight = 2
    max_in_flight = max(1, int(max_in_flight))
    queue = ov.AsyncInferQueue(compiled, max_in_flight)
    n_outputs = len(compiled.outputs)
    done: dict[int, list[np.ndarray] | BaseException] = {}
    cond = threading.Condition()

    def on_done(request: Any, index: int) -> None:
        try:
            result: list[np.ndarray] | BaseException = [
                np.array(request.get_output_tensor(k).data, copy=True) for k in range(n_outputs)
            ]
        except BaseException as exc:  # surfaced to the caller in order
            result = exc
        with cond:
            done[index] = result
            cond.notify_all()

    queue.set_callback(on_done)

    def take(index: int) -> list[np.ndarray]:
        with cond:
            while index not in done:
                cond.wait()
            result = done.pop(index)
        if isinstance(result, BaseException):
            raise result
        return result

    submitted = 0
    next_out = 0
    try:
        for item in items:
            while submitted - next_out >= max_in_flight:
                yield take(next_out)
                next_out += 1
            feeds = [item] if isinstance(item, np.ndarray) else list(_as_arrays(item))
            queue.start_async(feeds, userdata=submitted, share_inputs=False)
            submitted += 1
        while next_out < submitted:
            yield take(next_out)
            next_out += 1
    finally:
        queue.wait_all()


def _as_arrays(item: Sequence[Any]) -> Iterator[np.ndarray]:
    for x in item:
        yield np.asarray(x)
