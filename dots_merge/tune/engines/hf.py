"""The transformers engine: the base loaded as a transformers model, our own seeded sampling loop
(`dots_merge.tune.generation`), weights replaced by copying into its parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dots_merge.errors import DotsMergeError
from dots_merge.faults import fault_point
from dots_merge.tune.engines.base import Engine, Weights
from dots_merge.tune.generation import Completion, generate, query_nll


class TransformersEngine(Engine):
    """A transformers model and its tokenizer (`load`: the base on `device`, tensor by tensor for a GPU)."""

    name = "transformers"

    def __init__(self, model, tokenizer):
        super().__init__(tokenizer)
        self.model = model
        self.state = model.state_dict(keep_vars=True)

    @classmethod
    def load(cls, model_dir, tokenizer, *, dtype: torch.dtype, device: torch.device,
             trust_remote_code: bool = False) -> TransformersEngine:  # fmt: skip
        """The model of `model_dir` in `dtype` on `device` (no full copy in host RAM for a GPU)."""
        from transformers import AutoModelForCausalLM

        placement = {} if device.type == "cpu" else {"device_map": str(device)}
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code, **placement
        )
        model.eval()
        fault_point("load")
        return cls(model, tokenizer)

    def check_names(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.state]
        if missing:
            raise DotsMergeError(f"the model class loaded for the base has no parameter {missing[0]!r}")

    def write(self, weights: Weights) -> None:
        with torch.no_grad():
            for name, tensor, dtype in weights:
                param = self.state[name]
                if dtype is not None and tensor.is_floating_point() and dtype != param.dtype:
                    tensor = tensor.to(dtype)  # as the merge writes it; the parameter's own dtype comes next
                param.data.copy_(tensor)

    def generate(self, prompts: Sequence[str], **kwargs) -> list[list[Completion]]:
        return generate(self.model, self.tokenizer, prompts, **kwargs)

    def query_nll(self, queries: Sequence[str], *, batch_size: int = 8, over: str = "query") -> list[float]:
        return query_nll(self.model, self.tokenizer, queries, batch_size=batch_size, over=over)

    def close(self) -> None:
        self.state = {}
        self.model = None
