"""The per-layer table `quantize` prints: one row per layer, with layers that differ only in their block
index on one row."""

from qattune.quant.report import LayerRecord, QuantReport


def linear(name: str, shape=(64, 32), weights="int4_sym", activations="int8_asym") -> LayerRecord:
    return LayerRecord(name, "Linear", shape, True, weights, activations)


def test_layer_table_merges_blocks_that_agree_and_keeps_those_that_differ():
    layers = [LayerRecord("tok_embeddings", "Embedding", (260, 32), False, reason="embedding (quantize_embedding=false)")]
    for block in range(6):
        layers.append(linear(f"layers.{block}.attn.q_proj"))
        layers.append(linear(f"layers.{block}.mlp.w2", shape=(32, 96), weights="int8_sym" if block == 3 else "int4_sym"))
    layers.append(linear("output", shape=(260, 32), weights="int8_sym", activations=None))
    table = QuantReport("convert", "8da4w", layers).layer_table()
    assert table.splitlines() == [
        "layer                  shape          weights    activations",
        "tok_embeddings         260x32         skipped: embedding (quantize_embedding=false)",
        "layers.0-5.attn.q_proj 64x32          int4_sym   int8_asym",
        "layers.0-2,4-5.mlp.w2  32x96          int4_sym   int8_asym",
        "layers.3.mlp.w2        32x96          int8_sym   int8_asym",
        "output                 260x32         int8_sym   -",
    ]
