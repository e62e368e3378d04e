"""Shared by the harnesses, runner and report: the job shape and names of the parts."""

from __future__ import annotations

from dataclasses import dataclass

from sogni_protocol.messages import RenderRequest

MODEL = "sogni-tiny-sd"
FLOOR_JOBS_PER_S = 100.0
COMMIT = "SQLite commit of one receipt (`Store.store_receipt`, WAL, synchronous=FULL)"


def bench_request(images: int, seed: int) -> RenderRequest:
    return RenderRequest(
        model_id=MODEL,
        positive_prompt="dispatch benchmark",
        steps=1,
        guidance=1.0,
        width=64,
        height=64,
        seed=seed,
        number_of_images=images,
    )


@dataclass(frozen=True)
class Settings:
    processes: int = 5
    nodes_per_process: int = 10
    requests: int = 4
    images_per_request: int = 500
    rounds: int = 3
    profile: bool = True
    keep: bool = False

    @property
    def nodes(self) -> int:
        return self.processes * self.nodes_per_process

    @property
    def jobs(self) -> int:
        return self.requests * self.images_per_request


QUICK = Settings(requests=4, images_per_request=250, rounds=3)
