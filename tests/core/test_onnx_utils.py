"""ONNX helpers: a model stamped with a newer IR version than ONNX Runtime reads still runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from damo_plugins.core.errors import DamoError
from damo_plugins.core.onnx_utils import MAX_ORT_IR_VERSION, ort_loadable, ort_session


def _relu_model(ir_version: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def test_newer_ir_version_runs_and_the_callers_model_is_untouched() -> None:
    newer = _relu_model(15)  # ONNX Runtime 1.32 (installed here) rejects IR versions > 14
    x = np.array([[-1.0, 0.0, 2.0], [3.0, -4.0, 0.5]], np.float32)
    (y,) = ort_session(newer, threads=1).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert newer.ir_version == 15  # a copy was stamped, not the caller's
    assert ort_loadable(newer).ir_version == MAX_ORT_IR_VERSION


def test_supported_ir_version_is_passed_through() -> None:
    model = _relu_model(8)
    assert ort_loadable(model) is model


def test_unloadable_model_is_one_clear_error() -> None:
    broken = _relu_model(8)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(DamoError, match="ONNX Runtime cannot load the model"):
        ort_session(broken)
