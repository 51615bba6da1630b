"""Progress reporting for the toy build: tqdm bars and stage lines on stderr, or silence."""

from __future__ import annotations

import sys
from typing import Any


class _NullBar:
    def update(self, n: int = 1, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, mininterval=0.5)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self._bar.set_postfix(
                {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in postfix.items()},
                refresh=False,
            )
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class Progress:
    """Hands out progress bars and prints stage messages when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, total: int, desc: str) -> _NullBar | _TqdmBar:
        return _TqdmBar(total, desc) if self.enabled else _NullBar()

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[sae-vllm toy] {message}", file=sys.stderr, flush=True)
