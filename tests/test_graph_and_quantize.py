"""The exported graphs are ones ONNX Runtime can fuse, and int8 passes really quantize."""
import onnx
import pytest

from millis.common.errors import MillisError
from millis.optimize.build import graph, quantize
from millis.optimize.build.export import export
from millis.encoder.source import resolve
from millis.encoder.text import TextEncoder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dirs):
    out = {}
    for fam in ("bert", "distilbert", "roberta", "electra"):
        src = resolve(f"tiny:{fam}")
        d = tmp_path_factory.mktemp(fam)
        base = export(src, "embed", d)
        fused = d / "fused.onnx"
        out[fam] = (src, base, fused, graph.fuse(src, base, fused))
    return out


@pytest.mark.parametrize("fam", ["bert", "distilbert", "roberta", "electra"])
def test_transformer_fusions_happen(exported, fam):
    src, _, _, ops = exported[fam]
    layers = src.num_layers
    assert ops.get("Attention", 0) == layers, ops
    assert ops.get("SkipLayerNormalization", 0) == 2 * layers, ops
    # BERT/DistilBERT embeddings fuse into one op; RoBERTa's padding-offset positions keep a LayerNorm
    assert ops.get("EmbedLayerNormalization", 0) + ops.get("LayerNormalization", 0) == 1, ops
    assert ops.get("BiasGelu", 0) + ops.get("FastGelu", 0) + ops.get("Gelu", 0) == layers, ops


def test_minilm_fuses_fully(tmp_path):
    src = resolve("builtin:minilm")
    base = export(src, "embed", tmp_path)
    ops = graph.fuse(src, base, tmp_path / "fused.onnx")
    assert ops["Attention"] == 6 and ops["SkipLayerNormalization"] == 12 and ops["BiasGelu"] == 6
    assert ops.get("EmbedLayerNormalization") == 1
    # the unused BERT pooler (dense + tanh) is gone from an embedding graph
    assert "Tanh" not in ops


def test_prune_removes_dead_nodes():
    from onnx import helper, TensorProto

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["dead"])],
                          "g", [x], [y])
    m = helper.make_model(g)
    assert graph.prune(m) == 1
    assert [n.op_type for n in m.graph.node] == ["Relu"]


def test_dynamic_int8_quantizes_every_matmul(exported, tmp_path):
    src, _, fused, ops = exported["bert"]
    out = tmp_path / "q.onnx"
    quantize.dynamic(fused, out, per_channel=False)
    q = graph.count_ops(out)
    n_int8 = q.get("MatMulInteger", 0) + q.get("DynamicQuantizeMatMul", 0) + q.get("QAttention", 0)
    # per layer: QKV (inside Attention), attention output, FFN in, FFN out
    assert n_int8 >= 3 * src.num_layers, q
    assert q.get("QAttention", 0) == src.num_layers, q
    weights = [i for i in onnx.load(str(out)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 4 * src.num_layers


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_static_int8_inserts_calibrated_qdq(exported, tmp_path, method):
    """On the fused graph (what the catalog uses): activations really get QuantizeLinear nodes."""
    src, base, fused, _ = exported["bert"]
    enc = TextEncoder(src.path, src.input_names, 64)
    from millis.common.samples import sample_texts

    # one fixed length: Percentile / Entropy histograms need equal shapes
    batches = [enc.encode(sample_texts()[i:i + 8], pad_to=64).feeds for i in range(0, 32, 8)]
    out = tmp_path / "qdq.onnx"
    quantize.static(fused, out, batches, method=method, per_channel=True)
    q = graph.count_ops(out)
    assert q.get("QuantizeLinear", 0) >= 2 * src.num_layers, q  # activations of the MatMuls
    assert q.get("DequantizeLinear", 0) > q.get("QuantizeLinear", 0), q  # + int8 weights
    with pytest.raises(MillisError, match="unknown calibration method 'magic'"):
        quantize.static(base, out, batches, method="magic")
    with pytest.raises(MillisError, match="static quantization needs calibration texts"):
        quantize.static(base, out, [], method="minmax")
