"""Fit a ReFT adapter on a frozen transformers model: what is trained is exactly what is served.

Batches are right-padded prompt + completion sequences. The adapter edits each prompt at the
positions the server edits at inference (`intervention_positions` for that prompt's length),
through the same plan and hooks the engine and the reference use (`server.reft.batch_edit`). The
loss is cross-entropy on completion tokens only. AdamW with a linear decay to zero (the defaults
of the HF Trainer that pyreft trains with); the rotation is never weight-decayed.

A spec with one side only ("l3", "f5", an explicit list) is stored with share_weights=True: without
sharing, both interventions of a layer would edit the same positions one after the other, which
adds parameters and nothing else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from server.adapters.config_json import config_from_dict
from server.adapters.fingerprint import model_fingerprint
from server.adapters.format import AdapterFile
from server.adapters.model_shape import ModelShape
from server.adapters.validation import validate
from server.reft.batch_edit import batch_edit_kwargs, raise_edit_failures
from server.reft.config import AdapterConfig
from server.reft.interventions import INTERVENTION_TYPES, Intervention
from server.reft.interventions import activation as activation_function
from server.reft.positions import intervention_positions, parse_positions
from server.training.data import Example
from server.training.modules import TrainableAdapter

IGNORE = -100  # label of prompt and padding tokens


@dataclass(frozen=True)
class Progress:
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based, over all epochs
    total_steps: int
    loss: float  # running mean over this epoch's steps so far


@dataclass
class TrainResult:
    adapter: AdapterFile
    trained_parameters: int
    seconds: float
    epoch_losses: list[float]

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1]


def adapter_config(
    model: nn.Module,
    *,
    intervention_type: str,
    layers: Sequence[int],
    rank: int,
    positions: str,
    share_weights: bool,
    activation: str,
    base_model: str,
) -> AdapterConfig:
    """The config of the adapter to train, checked by the adapter format's own rules and the model."""
    spec = parse_positions(positions)
    shape = ModelShape.of(model)
    raw = dict(
        base_model_fingerprint=model_fingerprint(model),
        type=intervention_type,
        rank=rank,
        hidden_size=shape.hidden_size,
        layers=list(layers),
        positions=str(spec),
        share_weights=share_weights or not spec.two_sided,
        activation=activation,
        base_model=base_model,
        dtype="float32",
    )
    config = config_from_dict(raw)
    out_of_range = [layer for layer in config.layers if layer >= shape.num_layers]
    if out_of_range:
        raise ValueError(
            f"layer {out_of_range[0]} out of range: the model has {shape.num_layers} layers (0..{shape.num_layers - 1})"
        )
    return config


def train_adapter(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    layers: Sequence[int],
    intervention_type: str = "loreft",
    rank: int = 4,
    positions: str = "f1+l1",
    share_weights: bool = False,
    activation: str = "linear",
    epochs: int = 10,
    lr: float = 4e-3,
    batch_size: int = 4,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: Callable[[Progress], None] | None = None,
    base_model: str = "",
) -> TrainResult:
    """Train an adapter on `examples`; the base model is frozen in place (eval mode, no gradients).

    `weight_decay` applies to the linear parameters only, never to the rotation. Deterministic for a
    seed; the global RNG state of the caller is left as it was.
    """
    if not examples:
        raise ValueError("no training examples")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    _check_lengths(model, examples)
    config = adapter_config(
        model,
        intervention_type=intervention_type,
        layers=layers,
        rank=rank,
        positions=positions,
        share_weights=share_weights,
        activation=activation,
        base_model=base_model,
    )
    model.requires_grad_(False).eval()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        # parameters start on the CPU; torch.manual_seed would also reseed the caller's GPUs
        torch.random.default_generator.manual_seed(seed)
        trainable = _new_trainable(model, config)
        schedule = _Schedule(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
        epoch_losses = _fit(model, trainable, config, list(examples), schedule, progress)
    adapter = AdapterFile(config, trainable.export())
    validate(adapter, ModelShape.of(model))
    trained = sum(p.numel() for p in trainable.parameters())
    return TrainResult(adapter, trained, time.perf_counter() - start, epoch_losses)


def _check_lengths(model: nn.Module, examples: Sequence[Example]) -> None:
    """The server refuses longer sequences; GPT-2's position embedding would fail on them mid-training."""
    window = getattr(model.config, "max_position_embeddings", None)
    if window is None:
        return
    for number, example in enumerate(examples, start=1):
        length = len(example.prompt_ids) + len(example.completion_ids)
        if length > window:
            raise ValueError(
                f"example {number} has {length} tokens (prompt and completion), "
                f"over the model's context window of {window}"
            )


@dataclass(frozen=True)
class _Schedule:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    seed: int


def _new_trainable(model: nn.Module, config: AdapterConfig) -> TrainableAdapter:
    kind = INTERVENTION_TYPES[config.type]
    trainable = TrainableAdapter(kind, config.hidden_size, config.rank, config.layers, config.interventions_per_layer)
    return trainable.to(next(model.parameters()).device)


def _fit(
    model: nn.Module,
    trainable: TrainableAdapter,
    config: AdapterConfig,
    examples: list[Example],
    schedule: _Schedule,
    progress: Callable[[Progress], None] | None,
) -> list[float]:
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    act = activation_function(config.activation)
    positions = _edited_positions(config, examples)
    steps_per_epoch = math.ceil(len(examples) / schedule.batch_size)
    total_steps = schedule.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(trainable.parameter_groups(schedule.weight_decay), lr=schedule.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    shuffle = torch.Generator().manual_seed(schedule.seed)
    epoch_losses = []
    for epoch in range(schedule.epochs):
        losses = []
        for rows in _batches(len(examples), schedule.batch_size, shuffle):
            interventions = trainable.interventions(act, dtype, device)
            loss = _batch_loss(model, interventions, [examples[i] for i in rows], [positions[i] for i in rows], device)
            if loss.requires_grad:  # else no example of the batch has an edited position: nothing to learn
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                decay.step()
            losses.append(loss.item())
            if progress is not None:
                step = epoch * steps_per_epoch + len(losses)
                progress(Progress(epoch + 1, schedule.epochs, step, total_steps, sum(losses) / len(losses)))
        epoch_losses.append(sum(losses) / len(losses))
    return epoch_losses


def _edited_positions(config: AdapterConfig, examples: list[Example]) -> list[list[list[int]]]:
    """Each example's edited prompt positions, as served. An example with none (explicit positions past a
    short prompt) still counts in its batch's loss but teaches nothing; if no example has any, no
    adapter can be learned from the data."""
    positions = [
        intervention_positions(config.position_spec, config.share_weights, len(example.prompt_ids))
        for example in examples
    ]
    if not any(any(edited) for edited in positions):
        shortest = min(len(example.prompt_ids) for example in examples)
        raise ValueError(
            f"positions {config.positions} edit no prompt token of any example (the shortest prompt has "
            f"{shortest}), so the adapter cannot change a completion"
        )
    return positions


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    order = torch.randperm(count, generator=generator).tolist()
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def _batch_loss(
    model: nn.Module,
    interventions: dict[int, list[Intervention]],
    batch: list[Example],
    positions: list[list[list[int]]],
    device: torch.device,
) -> Tensor:
    input_ids, attention_mask, labels = _collate(batch, device)
    # Project onto the vocabulary only where the next token is a completion token: prompts are
    # usually most of a sequence, and full-vocabulary logits are the largest activation there is.
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE
    edit = batch_edit_kwargs(model, interventions, positions, input_ids.shape[1])
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=predicts, **edit)
    raise_edit_failures(edit)
    return F.cross_entropy(out.logits.float(), labels[:, 1:][predicts[:, :-1]])


def _collate(batch: list[Example], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input ids, attention mask and labels (completion tokens only).

    Padding uses id 0: right padding sits after every real token, so causal attention never lets a
    real token see it, and its label is ignored.
    """
    width = max(len(e.prompt_ids) + len(e.completion_ids) for e in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(batch):
        tokens = example.prompt_ids + example.completion_ids
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        labels[row, len(example.prompt_ids) : len(tokens)] = torch.tensor(example.completion_ids)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)
