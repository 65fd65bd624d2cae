"""The SCPL paper's two text backbones (methods.md §4): `lstm` and `transformer`, 4 blocks each.

Block 1 embeds token ids (vocab_size × dim, id 0 = padding); blocks 2-4 are one bidirectional LSTM
layer (hidden = dim) or one pre-LayerNorm Transformer encoder layer each. Every block leaves a
`summary` (one vector per document) for local heads and the predictor:
  - embedding, Transformer: the mean over the document's real (non-padding) tokens;
  - LSTM: the mean of the two directions' final hidden states.
Predictor: Linear(dim, dim) → Tanh → Linear(dim, C) on block 4's summary.

Facts taken from the authors' released code (github.com/minyaho/scpl, model/nlp_single.py and
model/transformer/encoder/):
  - an LSTM block hands the next one its full output, both directions concatenated (2·dim wide:
    `EncoderLayer(h_dim*2, h_dim, f='lstm')`); its summary is `(h[0] + h[1]) / 2`;
  - each Transformer block is `TransformerEncoder(n_layers=1)`: a pre-norm layer (ReLU feed-forward,
    dropout 0.1) *followed by a final LayerNorm* (`Encoder.norm`), all matrices Xavier-uniform; the
    key padding mask comes from the token ids (`x != 0`); the predictor is `PredictLayer` with Tanh.
Where this departs from it (each on purpose):
  - padding is packed away from the LSTM (`packed: false` restores feeding it through, as released);
  - the embedding's summary averages real tokens only (released: `out0.mean(1)`, padding included),
    and the padding row is `padding_idx` (zero, never trained; released: an ordinary trained row);
  - an LSTM block starts from a zero state (released: block k+1 starts from block k's detached final
    (h, c)); carrying it would add a signal key no data batch has, which pipelined engines cannot feed;
  - `positional: sinusoidal` optionally adds a position table (released: none, the paper's default);
  - word vectors trained from scratch start at std dim^-0.5 (`embed_std: 1.0` gives PyTorch's N(0, 1),
    the released code's start without GloVe);
  - one `dim` for embedding and hidden sizes (released: emb_dim and h_dim, both 300 in the paper);
    PyTorch's LayerNorm (biased variance, eps inside the root) instead of the released hand-written one.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from scpl_kit.models.base import MODELS, BlockModel, ModelInputError, SignalBlock
from scpl_kit.signal import FEATURES, LENGTHS, SUMMARY, Signal

PAPER_BLOCKS = 4  # the embedding and three sequence layers
POSITIONAL = ("none", "sinusoidal")


def real_tokens(lengths: torch.Tensor, steps: int, device: torch.device | None = None) -> torch.Tensor:
    """[B, steps] bool on `device` (the lengths' own by default), True at a document's real tokens (batches
    are right-padded). The lengths may be on the host (signal.HOST_SIDE): copied over without the host waiting."""
    device = device or lengths.device
    return torch.arange(steps, device=device) < lengths.to(device, non_blocking=True).unsqueeze(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, D] over the positions where mask [B, T] is True. masked_fill, not a product,
    so whatever sits at padded positions (even a NaN) cannot leak in."""
    total = x.masked_fill(~mask.unsqueeze(-1), 0.0).sum(1)
    return total / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)


def sinusoidal_table(steps: int, dim: int) -> torch.Tensor:
    """Vaswani et al.'s position table [steps, dim]: sin on even features, cos on odd ones."""
    position = torch.arange(steps, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(steps, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]  # an odd dim has one cos fewer
    return table


class EmbeddingBlock(SignalBlock):
    def __init__(self, vocab_size: int, dim: int, max_len: int, positional: str = "none", embed_std: float | None = None,
                 lr_scale: float = 1.0) -> None:
        """`lr_scale`: the word vectors learn at this multiple of the rate (LocalUnit.parameter_groups)."""
        super().__init__()
        self.lr_scale = lr_scale
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        # Word vectors trained from scratch start at std dim^-0.5 (fairseq's and the Transformer paper's
        # scale), not PyTorch's N(0, 1): at std 1 the random start swamps what a few hundred steps learn
        # (measured on BBC News, Transformer width 36, 3 epochs: 43% test accuracy at std 1, 93% at 0.1).
        nn.init.normal_(self.embedding.weight, std=dim**-0.5 if embed_std is None else embed_std)
        with torch.no_grad():
            self.embedding.weight[0].zero_()  # the padding row
        # Not persistent: the table is a function of the shape, so checkpoints need not carry it.
        table = sinusoidal_table(max_len, dim) if positional == "sinusoidal" else None
        self.register_buffer("positions", table, persistent=False)

    def forward(self, signal: Signal) -> Signal:
        words = self.embedding(signal[FEATURES])
        # The summary is the bag of word vectors: the position table adds nothing about the document
        # but its length, and block 1's local loss is there to train the word vectors.
        out = words if self.positions is None else words + self.positions[: words.shape[1]]
        return {**signal, FEATURES: out, SUMMARY: masked_mean(words, real_tokens(signal[LENGTHS], words.shape[1], words.device))}


class BiLSTMBlock(SignalBlock):
    def __init__(self, in_dim: int, hidden: int, packed: bool = True, layer_norm: bool = False) -> None:
        """`layer_norm`: LayerNorm over the two directions' features handed to the next block (not the
        summary): what lets end-to-end BP train three stacked BiLSTMs on little data (docs/text.md)."""
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden) if layer_norm else nn.Identity()
        self.packed = packed

    def forward(self, signal: Signal) -> Signal:
        x = signal[FEATURES]
        if self.packed:
            # Packing stops each direction at the document's last real token, so the final states are
            # those of the document alone, whatever T the batch was padded to. pack wants CPU lengths
            # (on the host already, unless a pipeline stage received them: signal.HOST_SIDE).
            # Clamped: torch.distributed.pipelining learns a stage's shapes by running it once on
            # uninitialised buffers (the gpipe engine), whose "lengths" can be anything; real ones are in range.
            lengths = signal[LENGTHS].cpu().clamp(1, x.shape[1])
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, (h, _) = self.lstm(packed)  # h comes back in the batch's own order
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # T unchanged
        else:  # the released code: the forward direction reads the padding, the backward one starts in it
            out, (h, _) = self.lstm(x)
        return {**signal, FEATURES: self.norm(out), SUMMARY: h.mean(0)}  # h: [2 directions, B, hidden]


class TransformerBlock(SignalBlock):
    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, final_norm: bool = True) -> None:
        super().__init__()
        # A bare layer (not nn.TransformerEncoder) never turns the batch into nested tensors, so its
        # inference fast path (eval, no grad, even heads) keeps [B, T, dim]; tests compare it to the slow one.
        self.layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        for weight in (p for p in self.layer.parameters() if p.dim() > 1):
            nn.init.xavier_uniform_(weight)  # as the released TransformerEncoder.reset_parameters

    def forward(self, signal: Signal) -> Signal:
        x = signal[FEATURES]
        mask = real_tokens(signal[LENGTHS], x.shape[1], x.device)
        out = self.norm(self.layer(x, src_key_padding_mask=~mask))  # True in the mask = ignore that key
        return {**signal, FEATURES: out, SUMMARY: masked_mean(out, mask)}


class SequenceModel(BlockModel):
    """A BlockModel over token ids: input_shape = (max_len,), batches carry `lengths`."""

    def example_signal(self, batch: int = 1) -> Signal:
        """Full max_len: pipelined engines pad every batch to this example's shape."""
        (steps,) = self.input_shape
        ids = torch.ones(batch, steps, dtype=torch.long)  # token 1 (unk): any real token will do
        return {FEATURES: ids, LENGTHS: torch.full((batch,), steps, dtype=torch.long)}

    def load_embeddings(self, weights: torch.Tensor) -> None:
        """Copy pretrained word vectors (row i = vocabulary id i, e.g. GloVe) into block 1. Rows past
        `weights` keep their random start; the padding row stays zero (it is padding_idx)."""
        table = self.blocks[0].embedding.weight
        rows, dim = weights.shape
        if dim != table.shape[1]:
            raise ModelInputError(f"pretrained word vectors are {dim}-dimensional but model.dim is {table.shape[1]}; set model.dim={dim}")
        if rows > table.shape[0]:
            raise ModelInputError(
                f"pretrained word vectors have {rows} rows but the embedding has data.vocab_size={table.shape[0]}; "
                f"set data.vocab_size to at least {rows} or pass one row per vocabulary id"
            )
        with torch.no_grad():
            table[:rows].copy_(weights)
            table[0].zero_()


def check_text_input(model: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1 or input_shape[0] < 1:
        raise ModelInputError(
            f"model {model!r} takes token sequences shaped (max_len,), got input shape {tuple(input_shape)}; "
            "use a text dataset (data=bbcnews, ...)"
        )
    return int(input_shape[0])


def predictor(dim: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, num_classes))


@MODELS.register("lstm")
def lstm(input_shape: tuple[int], num_classes: int, vocab_size: int = 30000, dim: int = 300, packed: bool = True,
         embed_std: float | None = None, embed_lr_scale: float = 1.0, layer_norm: bool = False) -> SequenceModel:
    max_len = check_text_input("lstm", input_shape)
    # Block 2 reads word vectors (dim); blocks 3-4 read the previous block's two directions side by side.
    sequence = [BiLSTMBlock(dim if k == 0 else 2 * dim, dim, packed, layer_norm) for k in range(PAPER_BLOCKS - 1)]
    embedding = EmbeddingBlock(vocab_size, dim, max_len, embed_std=embed_std, lr_scale=embed_lr_scale)
    return SequenceModel([embedding, *sequence], predictor(dim, num_classes), input_shape)


@MODELS.register("transformer")
def transformer(
    input_shape: tuple[int], num_classes: int, vocab_size: int = 30000, dim: int = 300, heads: int = 6,
    ff_dim: int = 300, dropout: float = 0.1, positional: str = "none", final_norm: bool = True, embed_std: float | None = None,
    embed_lr_scale: float = 1.0,
) -> SequenceModel:
    max_len = check_text_input("transformer", input_shape)
    if dim % heads:
        raise ModelInputError(f"model.dim ({dim}) must be divisible by model.heads ({heads}): each head takes dim/heads features")
    if positional not in POSITIONAL:
        raise ModelInputError(f"unknown model.positional {positional!r}; valid: {', '.join(POSITIONAL)}")
    sequence = [TransformerBlock(dim, heads, ff_dim, dropout, final_norm) for _ in range(PAPER_BLOCKS - 1)]
    return SequenceModel([EmbeddingBlock(vocab_size, dim, max_len, positional, embed_std, embed_lr_scale), *sequence], predictor(dim, num_classes), input_shape)
