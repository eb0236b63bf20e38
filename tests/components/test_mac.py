"""MAC specifics: the segment mask, no attention across segments, the segment/chunk rule."""

import pytest
import torch

from components.mac import MACSpec, mac_visibility
from titans_nas import load_spec
from titans_nas.config import SpecError


def test_mask_a_segment_token_sees_persistent_its_past_memory_and_segment_tokens():
    p, start, count = 3, 0, 5
    mask = mac_visibility(start, count, p)
    assert mask.shape == (count, p + 2 * count)
    for j in range(count):
        assert mask[j, :p].all()  # every persistent token
        memory, segment = mask[j, p : p + count], mask[j, p + count :]
        assert memory.tolist() == [i <= j for i in range(count)]  # h_i for i <= j
        assert segment.tolist() == [i <= j for i in range(count)]  # S_i for i <= j


def test_mask_of_a_later_piece_of_the_segment():
    """Streaming: tokens 4..6 of a segment see the cached h_0..h_3 and S_0..S_3 too."""
    mask = mac_visibility(4, 3, 2)
    assert mask.shape == (3, 2 + 2 * 7)
    assert mask[0, 2:].tolist() == [True] * 5 + [False] * 2 + [True] * 5 + [False] * 2


def test_nothing_of_another_segment_is_attended():
    """With the memory's learning rate at ~0 the memory cannot carry information, so the
    outputs of segment 2 must not depend on segment 1's tokens at all (only through memory)."""
    spec = MACSpec(
        segment_len=8, memory={"chunk_size": 8, "lr": {"theta_max": 1e-30}, "conv": None}, persistent={"num_tokens": 2}
    )
    torch.manual_seed(0)
    mac = spec.build(16, 2)
    x = torch.randn(1, 16, 16)
    y, _ = mac(x)
    x2 = x.clone()
    x2[:, :8] += torch.randn(1, 8, 16)
    y2, _ = mac(x2)
    assert not torch.allclose(y[:, :8], y2[:, :8])
    torch.testing.assert_close(y[:, 8:], y2[:, 8:], atol=1e-6, rtol=0)


def test_segment_must_be_a_multiple_of_the_memory_chunk():
    with pytest.raises(SpecError) as e:
        load_spec("mac-tiny", ["block.segment_len=20"])
    assert e.value.path == "block.segment_len" and "multiple" in e.value.reason


def test_the_retrieved_memory_tokens_reach_the_output():
    """Eq. 21-23: a segment's attention sees h = f_W(q(S)) read at the weights of its start.
    The same state with other retrieval weights (the update's own memory untouched) must
    change the very first output of the next segment, which sees only p, h_0 and S_0."""
    spec = MACSpec(segment_len=8, memory={"chunk_size": 8}, persistent={"num_tokens": 2})
    torch.manual_seed(0)
    mac = spec.build(16, 2)
    x = torch.randn(1, 16, 16)
    _, st = mac(x[:, :8], mac.init_state(1))
    y, _ = mac(x[:, 8:], st)
    other = tuple(w + 0.5 * torch.randn_like(w) for w in st.retrieval)
    y2, _ = mac(x[:, 8:], type(st)(st.memory, other, st.retrieval_conv, st.retrieved, st.segment))
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-3 * y[:, 0].abs().max()
