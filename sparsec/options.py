"""The options every entry point accepts (`torch.compile(..., options=...)`, `sparsec.compile`...)."""

from __future__ import annotations

from dataclasses import dataclass, fields

CODEGENS = ("auto", "triton", "cpp", "mlir")
ON_WEIGHT_CHANGE = ("recompile", "error")


@dataclass
class Options:
    passes: str | None = None  # pipeline string; None = the full default pipeline
    codegen: str = "auto"
    verify_each: bool = False
    print_ir_after: str | None = None  # a pass name or "all"
    autotune: bool = False
    inductor: bool = True
    on_weight_change: str = "recompile"

    def __post_init__(self):
        if self.codegen not in CODEGENS:
            raise ValueError(f"sparsec option codegen={self.codegen!r} is not one of {', '.join(CODEGENS)}")
        if self.on_weight_change not in ON_WEIGHT_CHANGE:
            raise ValueError(
                f"sparsec option on_weight_change={self.on_weight_change!r} is not one of {', '.join(ON_WEIGHT_CHANGE)}"
            )
        if self.print_ir_after is not None and self.print_ir_after != "all":
            from .pass_manager import parse_pipeline

            parse_pipeline(self.print_ir_after)  # names an existing pass, or a clear error
        if self.passes is not None:
            from .pass_manager import parse_pipeline

            parse_pipeline(self.passes)


def known_options() -> list[str]:
    return [f.name for f in fields(Options)]


def parse_options(options: dict | Options | None = None, **extra) -> Options:
    """Options from a dict (as torch.compile passes them) and keywords; unknown names are an error."""
    if isinstance(options, Options):
        if extra:
            options = {**{f.name: getattr(options, f.name) for f in fields(Options)}}
        else:
            return options
    merged = dict(options or {})
    merged.update(extra)
    unknown = sorted(set(merged) - set(known_options()))
    if unknown:
        raise ValueError(
            f"unknown sparsec option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(known_options())}"
        )
    return Options(**merged)
