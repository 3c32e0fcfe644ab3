"""The NRT model: a rating/hidden-state encoder and the seed's GRU decoder, exactly.

The decoder is the seed's `GRUDecoder` (embedding -> single-layer GRU -> linear ->
log_softmax). The encoder follows NRT (Li et al., SIGIR'17): user and item embeddings feed a
sigmoid MLP that regresses the rating; the rating, clamped and cast to int, is one-hot
encoded, and tanh(Linear([u, i, onehot])) is the decoder's initial hidden state.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .weights import Linear, NRTWeights


class GRUDecoder(nn.Module):
    """The seed's decoder, unchanged: it is the graph gruserve serves step by step."""

    def __init__(self, ntoken: int, emsize: int, hidden_size: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(ntoken, emsize)
        self.gru = nn.GRU(emsize, hidden_size, batch_first=True)
        self.linear = nn.Linear(hidden_size, ntoken)
        self.init_weights()

    def init_weights(self) -> None:
        initrange = 0.1
        self.word_embeddings.weight.data.uniform_(-initrange, initrange)
        self.linear.weight.data.uniform_(-initrange, initrange)
        self.linear.bias.data.zero_()

    def forward(self, seq: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # seq (B, T) int64, hidden (1, B, H)
        seq_emb = self.word_embeddings(seq)  # (B, T, E)
        output, hidden = self.gru(seq_emb, hidden)  # (B, T, H), (1, B, H)
        decoded = self.linear(output)  # (B, T, V)
        return F.log_softmax(decoded, dim=-1), hidden


class NRTEncoder(nn.Module):
    """(user, item) -> (predicted rating, initial hidden state)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.min_rating = config.min_rating
        self.max_rating = config.max_rating
        self.num_rating_classes = config.num_rating_classes
        self.user_embeddings = nn.Embedding(config.num_users, config.emsize)
        self.item_embeddings = nn.Embedding(config.num_items, config.emsize)
        self.first_layer = nn.Linear(config.emsize * 2, config.hidden_size)
        layer = nn.Linear(config.hidden_size, config.hidden_size)
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(config.mlp_layers)])
        self.last_layer = nn.Linear(config.hidden_size, 1)
        self.hidden_encoder = nn.Linear(
            config.emsize * 2 + config.num_rating_classes, config.hidden_size
        )
        initrange = 0.1
        self.user_embeddings.weight.data.uniform_(-initrange, initrange)
        self.item_embeddings.weight.data.uniform_(-initrange, initrange)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # user, item (B,) int64
        u_emb = self.user_embeddings(user)  # (B, E)
        i_emb = self.item_embeddings(item)  # (B, E)
        ui = torch.cat([u_emb, i_emb], dim=1)  # (B, 2E)
        hidden = torch.sigmoid(self.first_layer(ui))  # (B, H)
        for layer in self.layers:
            hidden = torch.sigmoid(layer(hidden))
        # squeeze(-1), not squeeze(): the latter also drops the batch axis at B = 1
        rating = self.last_layer(hidden).squeeze(-1)  # (B,)
        rating_class = rating.clamp(self.min_rating, self.max_rating).to(torch.int64)
        one_hot = F.one_hot(
            rating_class - int(self.min_rating), num_classes=self.num_rating_classes
        ).to(u_emb.dtype)  # (B, R)
        state = torch.tanh(self.hidden_encoder(torch.cat([u_emb, i_emb, one_hot], dim=1)))
        return rating, state.unsqueeze(0)  # (B,), (1, B, H)


class NRT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = NRTEncoder(config)
        self.decoder = GRUDecoder(config.ntoken, config.emsize, config.hidden_size)

    def forward(
        self, user: torch.Tensor, item: torch.Tensor, seq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: seq (B, T) is the decoder input; returns rating (B,), log-probs."""
        rating, hidden = self.encoder(user, item)
        log_probs, _ = self.decoder(seq, hidden)  # (B, T, V)
        return rating, log_probs


def sentence_format(words: list[int], max_len: int, pad: int, bos: int, eos: int) -> list[int]:
    """The seed's sequence format: [bos] + words[:max_len] + [eos], padded to max_len + 2."""
    length = len(words)
    if length >= max_len:
        return [bos] + list(words[:max_len]) + [eos]
    return [bos] + list(words) + [eos] + [pad] * (max_len - length)


def nrt_loss(
    rating_pred: torch.Tensor,
    rating_true: torch.Tensor,
    log_probs: torch.Tensor,
    target: torch.Tensor,
    pad_id: int,
    rating_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL over the words (pad positions never count) plus weighted rating MSE.

    Returns (total, text_nll, rating_mse) so callers can log the parts.
    """
    text_nll = F.nll_loss(
        log_probs.reshape(-1, log_probs.size(-1)), target.reshape(-1), ignore_index=pad_id
    )
    rating_mse = F.mse_loss(rating_pred, rating_true)
    return text_nll + rating_weight * rating_mse, text_nll, rating_mse


@torch.no_grad()
def greedy_decode(
    model: NRT, user: torch.Tensor, item: torch.Tensor, bos: int, eos: int, max_tokens: int
) -> tuple[list[list[int]], torch.Tensor]:
    """Reference greedy decoding, one step at a time, as the research code does it.

    Returns the token ids of each row (without bos, without the final eos) and the ratings.
    """
    model.eval()
    rating, hidden = model.encoder(user, item)
    batch = user.size(0)
    token = torch.full((batch, 1), bos, dtype=torch.int64, device=user.device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(max_tokens):
        log_probs, hidden = model.decoder(token, hidden)  # (B, 1, V)
        token = log_probs[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        for row, tok in enumerate(token.squeeze(1).tolist()):
            if done[row]:
                continue
            if tok == eos:
                done[row] = True
            else:
                outputs[row].append(tok)
        if all(done):
            break
    return outputs, rating


def nrt_weights(model: NRT) -> NRTWeights:
    """The model's weights as numpy arrays: what the ONNX graph builders take."""

    def array(t: torch.Tensor):
        return t.detach().cpu().float().numpy()

    def linear(layer: nn.Linear) -> Linear:
        return Linear(array(layer.weight), array(layer.bias))

    enc, dec = model.encoder, model.decoder
    return NRTWeights(
        config=model.config,
        user_embeddings=array(enc.user_embeddings.weight),
        item_embeddings=array(enc.item_embeddings.weight),
        first_layer=linear(enc.first_layer),
        layers=tuple(linear(layer) for layer in enc.layers),
        last_layer=linear(enc.last_layer),
        hidden_encoder=linear(enc.hidden_encoder),
        word_embeddings=array(dec.word_embeddings.weight),
        gru_weight_ih=array(dec.gru.weight_ih_l0),
        gru_weight_hh=array(dec.gru.weight_hh_l0),
        gru_bias_ih=array(dec.gru.bias_ih_l0),
        gru_bias_hh=array(dec.gru.bias_hh_l0),
        output=linear(dec.linear),
    )
