"""Rollouts with `transformers`' `model.generate`: the default engine, no extra dependencies.

Every prompt is repeated `n` times and the P*n rows are generated in chunks of
`batch_size` rows, left-padded to the longest prompt of the chunk (decoder-only models
continue from the right edge; the attention mask hides the padding and `generate`
derives position ids from it).

Sampling and its log-probs. The last logits processor, `_InverseCdfSampler`, draws the
token itself: one uniform number per row against the cumulative sum (float64) of the
softmax of the processed scores, an exact draw from that distribution. It returns
scores that are -inf everywhere but at the drawn token, and `generate` runs greedy, so
its argmax takes that token. `generate`'s own sampling, `torch.multinomial`, draws one
exponential number per vocabulary entry and row: at a 152k vocabulary on a CPU that was
40 ms of a 400 ms decoding step (docs/benchmarks.md). The log-softmax of the processed
scores at the drawn token is exactly the sampling log-prob; `output_scores=True` would
keep those scores for every step (T x rows x V floats: 64 rows x 256 tokens x 49k vocab
is 3 GB), so the sampler keeps one step's log-softmax and gathers it at the token that
the next call sees appended to `input_ids`; the final step is gathered after `generate`
returns. Memory is rows x V, independent of length.

The temperature and top-p warpers run ahead of the sampler (transformers' own classes,
so the distribution is the one `generate` would sample from); in greedy mode `generate`
adds no warpers of its own.

Nothing is inherited from the model. `generate` fills every unset field of the config
it is given from `model.generation_config` (a checkpoint's top_k=20 or
repetition_penalty=1.1 would leak into sampling and make the reported log-probs wrong),
so during the call the model's `generation_config` is swapped for a blank one and put
back afterwards, together with its train/eval mode.

Seeding. The sampler draws from torch's global generator of the model's device. The
engine forks the RNG state of the CPU and of the model's device, seeds both with `seed`,
generates, and restores the caller's state: same seed + same weights + same prompts, `n`, params and `batch_size`
-> identical rollouts, and the caller's own random stream is untouched. The chunking is
part of the recipe: a different `batch_size` consumes the stream in a different order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from mopd.models.packing import packed_linears
from mopd.rollout.base import SamplingParams, check_generate_args, rows_done
from mopd.types import Rollout

__all__ = ["HFRolloutEngine"]


class _InverseCdfSampler(LogitsProcessor):
    """Draws each row's token from softmax(scores) and records its log-prob, one step behind.

    Must be the last processor: its input is then the distribution to sample from. Its
    output leaves only the drawn token finite, for `generate`'s greedy choice.
    """

    def __init__(self) -> None:
        self.logprobs: list[torch.Tensor] = []  # one (rows,) tensor per completed step
        self.pending_RV: torch.Tensor | None = None  # log-softmax of the latest step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending_RV is not None:
            # input_ids now ends with the token drawn from the previous step's scores.
            self.logprobs.append(self._gather(input_ids[:, -1]))
        self.pending_RV = torch.log_softmax(scores.float(), dim=-1)  # (rows, V)
        tokens_R = draw(self.pending_RV)
        chosen_RV = torch.full_like(scores, float("-inf"))
        return chosen_RV.scatter_(1, tokens_R[:, None], 0.0)  # type: ignore[return-value]

    def _gather(self, tokens_R: torch.Tensor) -> torch.Tensor:
        assert self.pending_RV is not None
        return self.pending_RV.gather(-1, tokens_R[:, None]).squeeze(-1)  # (rows,)

    def finish(self, generated_RT: torch.Tensor) -> torch.Tensor:
        """Log-probs of all generated tokens, shape (rows, T)."""
        steps = generated_RT.shape[1]
        if len(self.logprobs) < steps:  # the last step's token never reached a processor
            self.logprobs.append(self._gather(generated_RT[:, len(self.logprobs)]))
        self.pending_RV = None
        return torch.stack(self.logprobs[:steps], dim=1)  # (rows, T)


def draw(logprobs_RV: torch.Tensor) -> torch.Tensor:
    """One token per row from exp(logprobs): the first index whose cumulative probability
    exceeds a uniform draw (float64 sums, so even a 1e-12 token keeps its share; a token
    of probability 0 is never drawn). Uses the global generator of the tensor's device;
    on a device without float64 (MPS) the draw runs on the CPU's."""
    device = logprobs_RV.device
    if device.type == "mps":
        logprobs_RV = logprobs_RV.cpu()
    cdf_RV = logprobs_RV.exp().cumsum(dim=-1, dtype=torch.float64)
    total_R1 = cdf_RV[:, -1:]
    if not (torch.isfinite(total_R1).all() and (total_R1 > 0).all()):
        raise FloatingPointError(
            "sampling: a row of next-token scores is NaN, infinite or all -inf "
            "(a model overflowing in its dtype, or broken weights)"
        )
    u_R1 = torch.rand(total_R1.shape, dtype=torch.float64, device=cdf_RV.device) * total_R1
    # u < total, so some entry exceeds it; the clamp only guards the last rounding step.
    tokens_R = torch.searchsorted(cdf_RV, u_R1, right=True).squeeze(-1)
    return tokens_R.clamp_(max=cdf_RV.shape[-1] - 1).to(device)


@contextmanager
def _generation_mode(model: Any) -> Iterator[None]:
    """Eval mode and a blank `generation_config` for the duration; both restored after."""
    was_training = model.training
    saved_config = model.generation_config
    model.generation_config = GenerationConfig()
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved_config
        model.train(was_training)


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU generator and `device`'s; the caller's states are restored after.

    Only the generators that are forked get seeded (`torch.manual_seed` would reseed
    every GPU, including ones the caller uses for something else).
    """
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
            yield
    else:  # other accelerators: fork and seed all of that type
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(seed)
            yield


class HFRolloutEngine:
    """Samples with `model.generate` from the live (training) module.

    Args:
        model: a causal LM (`PreTrainedModel`); it is shared, not copied.
        tokenizer: its tokenizer; gives EOS and pad ids and decodes responses.
        batch_size: rows (prompt copies) per `generate` call; lower it to save memory.
        eos_token_ids: ids that end a response; default the tokenizer's EOS. Chat models
            whose template ends turns with a token other than the tokenizer's EOS should
            list both.
        packed_weights: generate on packed copies of large bf16 CPU weights, made at
            the start of each call (:mod:`mopd.models.packing`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        eos_token_ids: Sequence[int] | None = None,
        packed_weights: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if eos_token_ids is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    "the tokenizer has no eos_token_id: pass eos_token_ids=[...] to HFRolloutEngine"
                )
            eos_token_ids = [tokenizer.eos_token_id]
        if len(eos_token_ids) == 0:
            raise ValueError("eos_token_ids must name at least one token id")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.packed_weights = packed_weights
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        # Rows that finished early are filled with pad after EOS; any id works since the
        # tail is cut at the first EOS, so fall back to EOS when there is no pad token.
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = int(pad) if pad is not None else self.eos_token_ids[0]

    def update_weights(self, model: Any) -> None:
        """Sample from `model` from now on; the live module needs no copying."""
        self.model = model

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int,
        params: SamplingParams,
        seed: int,
    ) -> list[list[Rollout]]:
        """Sample `n` responses per prompt; see `RolloutEngine.generate`."""
        check_generate_args(prompts, n)
        rows = [list(prompt) for prompt in prompts for _ in range(n)]  # prompt-major
        device = self.model.device
        flat: list[Rollout] = []
        with (
            _generation_mode(self.model),
            _seeded(seed, device),
            torch.no_grad(),
            packed_linears(self.model, enabled=self.packed_weights),  # fixed for the call
        ):
            for start in range(0, len(rows), self.batch_size):
                flat.extend(self._generate_chunk(rows[start : start + self.batch_size], params))
                rows_done(len(flat) - start)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _generate_chunk(self, rows: list[list[int]], params: SamplingParams) -> list[Rollout]:
        device = self.model.device
        width = max(len(row) for row in rows)
        input_ids_RL = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask_RL = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # left padding
            input_ids_RL[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask_RL[r, width - len(row) :] = 1

        sampler = _InverseCdfSampler()
        processors = LogitsProcessorList()
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        processors.append(sampler)
        config = GenerationConfig(
            do_sample=False,  # the sampler has drawn: greedy takes its only finite entry
            repetition_penalty=1.0,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            num_beams=1,
            num_return_sequences=1,
            use_cache=True,
            return_dict_in_generate=True,
        )
        out = self.model.generate(
            input_ids=input_ids_RL.to(device),
            attention_mask=attention_mask_RL.to(device),
            generation_config=config,
            logits_processor=processors,
        )
        generated_RT = out.sequences[:, width:]  # (rows, T), T <= max_new_tokens
        logprobs_RT = sampler.finish(generated_RT)
        return [
            self._to_rollout(tokens, logprobs)
            for tokens, logprobs in zip(generated_RT.tolist(), logprobs_RT.tolist(), strict=True)
        ]

    def _to_rollout(self, tokens: list[int], logprobs: list[float]) -> Rollout:
        """Cut after the first EOS; everything later is padding of a finished row."""
        eos_at = next((t for t, tok in enumerate(tokens) if tok in self.eos_token_ids), None)
        # Without EOS the row ran out of length (max_new_tokens, or the model's context).
        end = len(tokens) if eos_at is None else eos_at + 1
        response = tuple(tokens[:end])
        return Rollout(
            response_ids=response,
            logprobs=tuple(logprobs[:end]),
            text=self.tokenizer.decode(list(response), skip_special_tokens=True),
            truncated=eos_at is None,
        )
