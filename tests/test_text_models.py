"""The text backbones (models/text.py): what packing and masking guarantee (a document's features do
not depend on how far its batch was padded), the summaries recomputed here one document at a time,
shapes, pretrained vectors, config errors, and one training step of every method."""

import math

import pytest
import torch

from scpl_kit.config import compose_config
from scpl_kit.methods import METHODS, build_units
from scpl_kit.methods.units import inference_route, readouts
from scpl_kit.models import ModelInputError, build_model
from scpl_kit.models.base import run_block
from scpl_kit.models.text import BiLSTMBlock, masked_mean, real_tokens
from scpl_kit.signal import FEATURES, LABELS, LENGTHS, SUMMARY, summary, without_summary
from scpl_kit.train import options
from updates import attach, step

VOCAB, DIM, MAX_LEN, CLASSES = 50, 12, 10, 3
SMALL = {"lstm": {"dim": DIM}, "transformer": {"dim": DIM, "heads": 4, "ff_dim": 16}}  # even heads, as the paper's 6: PyTorch's fast path runs
MODELS_UNDER_TEST = [("lstm", {}), ("transformer", {}), ("transformer", {"positional": "sinusoidal"})]
LENGTHS_ = [5, 3, 7, 1]  # the documents' real lengths: the longest is 7, below MAX_LEN


def text_model(name: str, **overrides):
    torch.manual_seed(0)
    return build_model(name, (MAX_LEN,), CLASSES, vocab_size=VOCAB, **{**SMALL[name], **overrides})


def documents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS_]  # ids ≥ 1: 0 is padding


def padded(docs: list[torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(docs), steps, dtype=torch.long)
    for i, doc in enumerate(docs):
        ids[i, : len(doc)] = doc
    return {FEATURES: ids, LENGTHS: torch.tensor([len(d) for d in docs]), LABELS: torch.arange(len(docs)) % CLASSES}


@torch.no_grad()
def block_summaries(model, signal) -> list[torch.Tensor]:
    found = []
    for block in model.blocks:
        signal = run_block(block, without_summary(signal))
        found.append(summary(signal))
    return found


@pytest.mark.parametrize(("name", "overrides"), MODELS_UNDER_TEST)
def test_padding_does_not_change_a_document(name, overrides) -> None:
    """The same documents padded to the batch's longest (7) and to max_len (10): every block's summary
    and the class scores agree, in eval mode (no dropout)."""
    model = text_model(name, **overrides).eval()
    short, long = padded(documents(), 7), padded(documents(), MAX_LEN)
    for a, b in zip(block_summaries(model, short), block_summaries(model, long), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(short)[FEATURES], model(long)[FEATURES], atol=1e-5, rtol=1e-5)


def test_unpacked_lstm_reads_the_padding() -> None:
    """packed: false is the released code's behaviour: more padding, other features (the embedding's
    summary, which never sees the LSTM, still agrees)."""
    model = text_model("lstm", packed=False).eval()
    short, long = block_summaries(model, padded(documents(), 7)), block_summaries(model, padded(documents(), MAX_LEN))
    torch.testing.assert_close(short[0], long[0])
    assert not torch.allclose(short[1], long[1], atol=1e-3)
    # Block 2's difference is confined to documents shorter than the padded length: every one here.
    assert all((short[1][i] - long[1][i]).abs().max() > 1e-4 for i in range(len(LENGTHS_)))


def test_lstm_summary_is_the_mean_of_both_final_states_of_the_document_alone() -> None:
    """Each document run alone, unpadded, through the block's own nn.LSTM: the block's summary is the
    mean of the two directions' final hidden states, its features that run's outputs (zeros after)."""
    torch.manual_seed(0)
    block = BiLSTMBlock(DIM, 8)
    lengths = torch.tensor(LENGTHS_)
    x = torch.randn(len(LENGTHS_), MAX_LEN, DIM)
    x[~real_tokens(lengths, MAX_LEN)] = 1e3  # loud padding: it must not reach anything
    with torch.no_grad():
        out = block({FEATURES: x, LENGTHS: lengths})
        assert out[FEATURES].shape == (len(LENGTHS_), MAX_LEN, 16)  # both directions side by side, T kept
        for i, n in enumerate(LENGTHS_):
            alone, (h, _) = block.lstm(x[i : i + 1, :n])
            torch.testing.assert_close(out[SUMMARY][i], (h[0, 0] + h[1, 0]) / 2)
            torch.testing.assert_close(out[FEATURES][i, :n], alone[0])
            assert out[FEATURES][i, n:].abs().sum() == 0


def test_masked_mean_is_the_mean_over_real_tokens() -> None:
    x = torch.randn(len(LENGTHS_), MAX_LEN, DIM)
    mask = real_tokens(torch.tensor(LENGTHS_), MAX_LEN)
    x[~mask] = float("nan")  # not even a NaN in the padding leaks in
    expected = torch.stack([sum(x[i, t] for t in range(n)) / n for i, n in enumerate(LENGTHS_)])
    torch.testing.assert_close(masked_mean(x, mask), expected)


@pytest.mark.parametrize(("name", "overrides"), MODELS_UNDER_TEST)
def test_block_summaries_average_real_tokens(name, overrides) -> None:
    """Block 1's summary is the mean of the documents' word vectors, looked up here row by row (never
    the positions); a Transformer block's is the mean of its own outputs at real positions."""
    model = text_model(name, **overrides).eval()
    docs = documents()
    signal = padded(docs, MAX_LEN)
    with torch.no_grad():
        first = run_block(model.blocks[0], signal)
        table = model.blocks[0].embedding.weight
        torch.testing.assert_close(first[SUMMARY], torch.stack([table[doc].mean(0) for doc in docs]))
        if name == "transformer":
            second = run_block(model.blocks[1], without_summary(first))
            expected = torch.stack([second[FEATURES][i, :n].mean(0) for i, n in enumerate(LENGTHS_)])
            torch.testing.assert_close(second[SUMMARY], expected)


@pytest.mark.parametrize(("name", "overrides"), MODELS_UNDER_TEST)
def test_shapes(name, overrides) -> None:
    model = text_model(name, **overrides)
    assert model.block_output_shapes() == [(DIM,)] * 4
    example = model.example_signal(2)
    assert example[FEATURES].shape == (2, MAX_LEN) and example[LENGTHS].tolist() == [MAX_LEN, MAX_LEN]
    signal = padded(documents(), 7)
    assert model.predictor(torch.zeros(4, DIM)).shape == (4, CLASSES)
    assert model(signal)[FEATURES].shape == (4, CLASSES)
    model.eval()  # eval (and no_grad) is where PyTorch's fast paths could change the shape
    with torch.no_grad():
        out = signal
        for block in model.blocks:
            out = run_block(block, without_summary(out))
            assert out[FEATURES].shape[:2] == (4, 7)
        assert out[FEATURES].shape == (4, 7, 2 * DIM if name == "lstm" else DIM)


def test_transformer_fast_path_matches_the_slow_one() -> None:
    """In eval without grad PyTorch takes its fused encoder-layer path (even heads); with grad, the
    ordinary one. Same shape, same values (the padding-mask handling included)."""
    model = text_model("transformer").eval()
    signal = padded(documents(), MAX_LEN)
    with torch.no_grad():
        fast = block_summaries(model, signal)
        fast_scores = model(signal)[FEATURES]
    slow = []
    out = signal
    for block in model.blocks:
        out = run_block(block, without_summary(out))
        assert out[FEATURES].shape[:2] == (4, MAX_LEN)
        slow.append(summary(out).detach())
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_scores, model(signal)[FEATURES].detach(), atol=1e-5, rtol=1e-5)


STEP_OPTIONS = {
    "scpl": [{"projector": "i"}, {"projector": "m", "projector_hidden": 16, "projector_dim": 8}],
    "early_exit": [{"hidden": 16}],
    "al": [{"bridge_hidden": 16, "code_dim": 8}],
    "contsup": [{"context": "R0"}],  # its context encoders are convolutions: image models only
    "infopro": [],  # reconstructs an image: image models only (test_methods.py checks the error)
    "auglocal": [],  # auxiliary BasicBlocks over feature maps: image models only (likewise)
    "deinforeg": [{"projector": "i"}, {"projector": "m", "projector_dim": 16}],
}


@pytest.mark.parametrize("name", ["lstm", "transformer"])
@pytest.mark.parametrize(("method", "method_options"), [(m, o) for m in METHODS.names() for o in STEP_OPTIONS.get(m, [{}])])
def test_every_method_trains_a_step_and_infers(name, method, method_options) -> None:
    """Projector "i" (identity) is the paper's text default; "m" its MLP. Each unit's handoff feeds the
    next, every loss is finite, and the inference route ends in class scores."""
    model = text_model(name)
    units = build_units(method, model, CLASSES, **method_options)
    signal = padded(documents(), 7)
    handed = signal
    attach(units, 1e-3, 1e-5, 10)
    for unit in units:
        handed, losses = step(unit, handed)
        assert losses and all(math.isfinite(float(v)) for v in losses.values()), losses
    out = {k: v for k, v in signal.items() if k != LABELS}
    with torch.no_grad():
        for i, phase in inference_route(units):
            out = units[i].infer(out, phase)
    assert readouts(out)["scores"].shape == (4, CLASSES)


def test_load_embeddings_copies_the_vectors() -> None:
    model = text_model("lstm")
    table = model.blocks[0].embedding.weight
    before = table.detach().clone()
    vectors = torch.randn(20, DIM)
    model.load_embeddings(vectors)
    torch.testing.assert_close(table[1:20].detach(), vectors[1:])
    assert table[0].abs().sum() == 0  # the padding row stays zero
    torch.testing.assert_close(table[20:].detach(), before[20:])  # ids the vectors do not cover keep their start
    with pytest.raises(ModelInputError, match=rf"model\.dim.*{DIM}") as caught:
        model.load_embeddings(torch.randn(20, DIM + 1))
    assert str(DIM + 1) in str(caught.value)
    with pytest.raises(ModelInputError, match=rf"{VOCAB + 1} rows.*data\.vocab_size={VOCAB}"):
        model.load_embeddings(torch.randn(VOCAB + 1, DIM))


def test_dim_not_divisible_by_heads_names_both_keys() -> None:
    with pytest.raises(ModelInputError, match=r"model\.dim \(12\).*model\.heads \(5\)"):
        build_model("transformer", (MAX_LEN,), CLASSES, vocab_size=VOCAB, dim=12, heads=5)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_image_shape_is_refused_with_the_fix(name) -> None:
    with pytest.raises(ModelInputError, match=r"token sequences shaped \(max_len,\).*\(3, 32, 32\).*data=bbcnews"):
        build_model(name, (3, 32, 32), CLASSES)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_config_takes_vocab_size_from_the_data_config(name) -> None:
    """conf/model/<name>.yaml builds as it stands, its vocab_size read from data.vocab_size. (The
    default profile's model.width is for the image models, so it is dropped here.)"""
    cfg = compose_config([f"model={name}", "~model.width", "+data.vocab_size=77", f"model.dim={DIM}"])
    settings = options(cfg.model)
    assert settings["vocab_size"] == 77
    model = build_model(name, (MAX_LEN,), CLASSES, **settings)
    assert model.blocks[0].embedding.num_embeddings == 77 and model.block_output_shapes() == [(DIM,)] * 4
    assert compose_config([f"model={name}"]).model.vocab_size == 30000  # an image data config: the paper's size
