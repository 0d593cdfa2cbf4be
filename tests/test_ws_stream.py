"""chat.ws_stream, the code beneath trio-websocket: its assumptions on the pinned
trio-websocket and wsproto. If one of these fails after an upgrade, switch the fast
paths off (--no-fast-paths) and read the module's docstring."""

from __future__ import annotations

import pytest
from wsproto.frame_protocol import FrameProtocol

import protocol as wire
from chat.ws_stream import encode_text_delta_frame


@pytest.mark.parametrize("extra", [0, 1, 125, 126, 127, 65_535, 65_536, 200_000])
def test_hot_path_websocket_frame_is_the_one_wsproto_sends(extra: int) -> None:
    # Around the 7-bit, 16-bit and 64-bit length forms (the JSON around the text adds
    # a fixed number of bytes), with two-byte characters.
    for content in ("é" * (extra // 2), "x" * extra):
        ours = encode_text_delta_frame("turn_1", content)
        theirs = FrameProtocol(client=False, extensions=[]).send_data(
            wire.encode_text_delta("turn_1", content), fin=True
        )
        assert ours == theirs
