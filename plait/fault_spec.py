"""The `fault.inject` grammar: which faults to rehearse, parsed and checked with the config.

    crash@rank=2,step=7           rank 2 exits abruptly as step 7 begins
    hang@rank=1,step=5            rank 1 sleeps for ever before its first collective of step 5
    slow@rank=3,delay=0.5[,step=] rank 3 sleeps `delay` seconds before each collective from step on
    ...,restart=N                 only in the workers' N-th restart (0: the first start)

Several faults are separated by ";". This module only reads the text, so that config
validation can check it without importing the resilience layer; plait/resilience/inject.py
makes the faults happen.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.errors import ConfigError

KINDS = ("crash", "hang", "slow")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int = 1
    delay: float = 0.0
    restart: int = -1  # -1: in whichever worker generation reaches the step first

    def describe(self) -> str:
        extra = f",delay={self.delay:g}" if self.kind == "slow" else ""
        extra += f",restart={self.restart}" if self.restart >= 0 else ""
        return f"{self.kind}@rank={self.rank},step={self.step}{extra}"


def parse_faults(text: str) -> list[Fault]:
    """Parse `fault.inject`; anything malformed raises ConfigError naming the field."""
    faults = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        kind, at, args = item.partition("@")
        kind = kind.strip()
        if kind not in KINDS or not at:
            raise ConfigError(f"fault.inject: '{item}' must look like crash@rank=R,step=S, "
                              "hang@rank=R,step=S or slow@rank=R,delay=SECONDS")
        values: dict[str, str] = {}
        for pair in args.split(","):
            key, eq, value = pair.partition("=")
            if not eq or key.strip() not in ("rank", "step", "delay", "restart"):
                raise ConfigError(f"fault.inject: '{pair}' in '{item}' is not rank=, step=, delay= or restart=")
            values[key.strip()] = value.strip()
        try:
            rank = int(values["rank"])
            step = int(values.get("step", 1))
            delay = float(values.get("delay", 0))
            restart = int(values.get("restart", -1))
        except KeyError:
            raise ConfigError(f"fault.inject: '{item}' needs rank=") from None
        except ValueError:
            raise ConfigError(f"fault.inject: '{item}' has a value that is not a number") from None
        if rank < 0 or step < 1:
            raise ConfigError(f"fault.inject: '{item}' needs rank >= 0 and step >= 1")
        if kind == "slow" and delay <= 0:
            raise ConfigError(f"fault.inject: '{item}' needs delay= seconds > 0")
        if kind != "slow" and "step" not in values:
            raise ConfigError(f"fault.inject: '{item}' needs step=")
        faults.append(Fault(kind, rank, step, delay, restart))
    return faults
