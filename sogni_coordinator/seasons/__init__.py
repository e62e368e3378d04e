"""Season leaderboards (leaderboard page, seed 003): five boards, each with its prize pool.

`boards` holds the ids, the prize rules and the ranking; `eligible` decides which settled jobs
count (no farming); `artists`, `workers`, `ambassadors` and `stakers` compute each board's
points; `tally.board_rows` ranks any of them; `command` is `sogni-coordinator leaderboard`;
`hardware` records the device each worker advertised (the Workers boards' column); `prizes`
gathers every board's inputs for the season's airdrop (`settlement/airdrop.py`), which
`close_cli` (`sogni-coordinator season close N`) posts.
docs/ECONOMICS.md, "Seasons".
"""

from sogni_coordinator.seasons.boards import BOARD_RULES, BOARDS, Row
from sogni_coordinator.seasons.tally import board_rows

__all__ = ["BOARDS", "BOARD_RULES", "Row", "board_rows"]
