"""The quantization recipe: one validated, frozen record of every choice that shapes the masks.

Why this module exists: the recipe (statistic, percentile, alpha, eps, retained blocks, encoder,
mask dtype) is decided once by ``hif4fmt build``, written verbatim into the .hif4 header and read
back equal. Keeping it separate from the code that applies it means the state file, the CLI and the
runtime all agree on one definition, and every bad value is refused in one place with a message that
states the fix. Torch-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from hif4fmt.constants import MAX_RETAINED_BLOCK_INDEX as MAX_BLOCK_INDEX
from hif4fmt.errors import RecipeError

COMPONENTS = ("transformer", "transformer_2")  # Wan2.2 experts: high noise, low noise
STATISTICS = ("percentile", "max")  # how a_i is taken from the |x| distribution per input channel
ENCODERS = ("toolkit", "ascend")  # HiF4 encoder variants (see spec/hifloat4.md)
MASK_DTYPES = ("float32", "float16", "bfloat16")  # on-disk dtype of the per-channel masks
MAX_RETAINED_BLOCKS = 2  # whole blocks kept high precision, across both experts together

RETAINED_BLOCK_PATTERN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):(0|[1-9][0-9]{0,8})", re.ASCII)  # COMPONENT:INDEX

DEFAULT_PERCENTILE = 99.9  # the paper's "high percentile" of |x|
DEFAULT_ALPHA = 0.5  # SmoothQuant migration strength
DEFAULT_EPS = 1e-6  # added to a_i before the power, guards a_i = 0


@dataclass(frozen=True, order=True)
class RetainedBlock:
    """One whole transformer block kept in high precision: ``component`` and block ``index``."""

    component: str
    index: int

    @classmethod
    def parse(cls, text: str) -> "RetainedBlock":
        """Parse ``COMPONENT:INDEX`` (e.g. ``transformer_2:39``)."""
        match = RETAINED_BLOCK_PATTERN.fullmatch(text)
        if match is None:
            raise RecipeError(f"retained block {text!r}: expected COMPONENT:INDEX with INDEX a decimal block "
                              f"number below {MAX_BLOCK_INDEX + 1}, e.g. transformer:0")
        block = cls(match.group(1), int(match.group(2)))
        block.validate()
        return block

    def validate(self) -> None:
        if self.component not in COMPONENTS:
            raise RecipeError(
                f"retained block {self.component}:{self.index}: unknown component "
                f"{self.component!r}; expected one of {', '.join(COMPONENTS)}"
            )
        if (not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0
                or self.index > MAX_BLOCK_INDEX):
            raise RecipeError(f"retained block {self.component}:{self.index}: index must be an int in "
                              f"[0, {MAX_BLOCK_INDEX}]")

    def __str__(self) -> str:
        return f"{self.component}:{self.index}"


@dataclass(frozen=True)
class Recipe:
    """How masks are computed: ``m_i = w_i**alpha / (a_i + eps)**(1 - alpha)``.

    ``a_i`` is the ``percentile``-th percentile of |x| per input channel when ``statistic`` is
    ``"percentile"``, or the exact max when it is ``"max"`` (``percentile`` is then None).
    """

    statistic: str = "percentile"
    percentile: float | None = DEFAULT_PERCENTILE
    alpha: float = DEFAULT_ALPHA
    eps: float = DEFAULT_EPS
    retained_blocks: tuple[RetainedBlock, ...] = field(default_factory=tuple)
    encoder: str = "toolkit"
    mask_dtype: str = "float32"

    def __post_init__(self) -> None:
        # normalise: sorted retained blocks, floats as floats
        blocks = tuple(sorted(RetainedBlock(b.component, b.index) if isinstance(b, RetainedBlock)
                              else RetainedBlock.parse(str(b)) for b in self.retained_blocks))
        object.__setattr__(self, "retained_blocks", blocks)
        self.validate()

    def validate(self) -> None:
        """Raise ``RecipeError`` naming the field, the value and the allowed range."""
        if self.statistic not in STATISTICS:
            raise RecipeError(f"statistic {self.statistic!r}: expected one of {', '.join(STATISTICS)}")
        if self.statistic == "percentile":
            p = self.percentile
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or not 0 < p <= 100:
                raise RecipeError(f"percentile {p!r}: expected a number in (0, 100], e.g. 99.9")
        elif self.percentile is not None:
            raise RecipeError("percentile must be omitted (None) when statistic is 'max'")
        for name, value, lo, hi in (("alpha", self.alpha, 0.0, 1.0),):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not lo <= value <= hi:
                raise RecipeError(f"{name} {value!r}: expected a number in [{lo}, {hi}], e.g. 0.5")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not math.isfinite(self.eps) or self.eps <= 0:
            raise RecipeError(f"eps {self.eps!r}: expected a finite number > 0, e.g. 1e-6")
        if self.encoder not in ENCODERS:
            raise RecipeError(f"encoder {self.encoder!r}: expected one of {', '.join(ENCODERS)}")
        if self.mask_dtype not in MASK_DTYPES:
            raise RecipeError(f"mask_dtype {self.mask_dtype!r}: expected one of {', '.join(MASK_DTYPES)}")
        for block in self.retained_blocks:
            block.validate()
        if len(set(self.retained_blocks)) != len(self.retained_blocks):
            raise RecipeError(f"retained blocks {[str(b) for b in self.retained_blocks]}: duplicates")
        if len(self.retained_blocks) > MAX_RETAINED_BLOCKS:
            raise RecipeError(
                f"{len(self.retained_blocks)} retained blocks ({', '.join(map(str, self.retained_blocks))}): "
                f"at most {MAX_RETAINED_BLOCKS} whole blocks may stay high precision across both experts"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as plain msgpack/JSON-able types (the form stored in the header)."""
        return {
            "statistic": self.statistic,
            "percentile": None if self.percentile is None else float(self.percentile),
            "alpha": float(self.alpha),
            "eps": float(self.eps),
            "retained_blocks": [str(b) for b in self.retained_blocks],
            "encoder": self.encoder,
            "mask_dtype": self.mask_dtype,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """Rebuild a recipe from ``to_dict`` output; unknown or missing keys raise ``RecipeError``."""
        if not isinstance(data, dict):
            raise RecipeError(f"recipe: expected a map, found {type(data).__name__}")
        expected = set(cls().to_dict())
        missing = sorted(expected - set(data))
        if missing:
            raise RecipeError(f"recipe: missing keys {missing}")
        blocks = data["retained_blocks"]
        if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, str) for b in blocks):
            raise RecipeError("recipe: retained_blocks must be a list of 'COMPONENT:INDEX' strings")
        return cls(
            statistic=data["statistic"],
            percentile=data["percentile"],
            alpha=data["alpha"],
            eps=data["eps"],
            retained_blocks=tuple(RetainedBlock.parse(b) for b in blocks),
            encoder=data["encoder"],
            mask_dtype=data["mask_dtype"],
        )
