"""Protocol ids, topics and size limits: the numbers both ends must agree on."""

from typing import Final

JOBS_PROTOCOL: Final = "/sogni/jobs/1.0.0"
"""Long-lived pull stream a node opens to each coordinator it trusts."""

CLIENT_PROTOCOL: Final = "/sogni/client/1.0.0"
"""One stream per exchange from an app to a coordinator: a render request (and its images),
a Daily Boost claim, or a balance query."""

CAPABILITIES_TOPIC: Final = "sogni/capabilities/1"
"""GossipSub topic for signed capability adverts (at most one per node every 30 s)."""

WIRE_VERSION: Final = 1
"""Version carried in every message map; a peer speaking another version is refused."""

CONTROL_FRAME_LIMIT: Final = 64 * 1024
"""Largest frame that carries no image: offers, progress, heartbeats, requests."""

RESULT_FRAME_LIMIT: Final = 32 * 1024 * 1024
"""Largest frame that may carry an image (node results, images streamed to clients)."""

MAX_IMAGES_PER_REQUEST: Final = 512
MAX_PROMPT_CHARS: Final = 4096
MAX_LORAS: Final = 8

EMBEDDED_MODEL_ID = "sogni-shapes-64"
"""The trained model shipped inside the node package: what a render asks for by default."""
