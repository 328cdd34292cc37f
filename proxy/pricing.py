"""What upstream tokens cost: the shipped list prices, and the lookup of a model's price by its name."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Dated snapshots (gpt-4o-mini-2024-07-18) and old-style ones (gpt-4-0613) cost what their base model costs.
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")
PRICES_TAKEN = "June 2025"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million input (prompt) and output (completion) tokens of *model*."""

    model: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float = 0.0

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1_000_000


# OpenAI's standard-tier list prices as published in June 2025 (not the cached-input, batch or flex rates).
# proxy.yaml's `pricing:` overrides and extends them; check them against https://openai.com/api/pricing.
DEFAULT_PRICES: tuple[ModelPrice, ...] = (
    ModelPrice("gpt-4o", 2.50, 10.00),
    ModelPrice("gpt-4o-mini", 0.15, 0.60),
    ModelPrice("gpt-4.1", 2.00, 8.00),
    ModelPrice("gpt-4.1-mini", 0.40, 1.60),
    ModelPrice("gpt-4.1-nano", 0.10, 0.40),
    ModelPrice("o1", 15.00, 60.00),
    ModelPrice("o3-mini", 1.10, 4.40),
    ModelPrice("o4-mini", 1.10, 4.40),
    ModelPrice("gpt-4-turbo", 10.00, 30.00),
    ModelPrice("gpt-3.5-turbo", 0.50, 1.50),
    ModelPrice("text-embedding-3-small", 0.02),
    ModelPrice("text-embedding-3-large", 0.13),
    ModelPrice("text-embedding-ada-002", 0.10),
)


class PriceList:
    """Prices by model name: *prices* (later entries win over earlier ones of the same model). A name without an
    entry of its own takes its base model's price when it is a dated snapshot of it; otherwise it has none."""

    def __init__(self, prices: Iterable[ModelPrice]) -> None:
        self._by_model = {price.model: price for price in prices}

    def price(self, model: str) -> ModelPrice | None:
        found = self._by_model.get(model)
        if found is None:
            found = self._by_model.get(_SNAPSHOT.sub("", model))
        return found
