"""A collective that times out or loses a rank becomes one line naming the collective and what to check; any
other error passes through untouched (engine.runtime.Collective, rank_failure_message)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import RankFailure
from engine.runtime import Runtime, rank_failure_message

GLOO_TIMEOUT = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete"
GLOO_PEER_DIED = ("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:6805. This is typically "
                  "caused by a remote worker crashing.")
GLOO_REFUSED = "Gloo connectFullMesh failed with [pair.cc:152] timed out connecting: SO_ERROR: Connection refused"


def two_ranks(rank: int = 0) -> Runtime:
    return Runtime(device=torch.device("cpu"), dtype=None, rank=rank, world_size=2, timeout_s=12.5)


def test_a_timeout_names_the_collective_the_timeout_key_and_the_way_on():
    line = rank_failure_message(GLOO_TIMEOUT, "the gradient all-reduce (DDP) of step 7", 0, 12.5)
    assert line.startswith("rank 0: the gradient all-reduce (DDP) of step 7 timed out after 12.5 s (dist.timeout_s)")
    assert "other ranks' logs" in line and "--dist.timeout_s" in line and "--checkpoint.resume auto" in line
    assert "\n" not in line


def test_a_dead_peer_and_a_refused_connection_say_a_rank_is_gone_not_that_it_timed_out():
    died = rank_failure_message(GLOO_PEER_DIED, "the stop vote", 1, 600)
    assert died.startswith("rank 1: another rank left during the stop vote") and "timed out" not in died
    refused = rank_failure_message(GLOO_REFUSED, "the process group set-up", 0, 600)
    assert refused.startswith("rank 0: could not reach another rank during the process group set-up")


def test_other_errors_are_not_taken_for_rank_failures():
    assert rank_failure_message("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", "x", 0, 600) is None


def test_the_innermost_collective_turns_a_transport_error_into_a_rank_failure():
    rt = two_ranks()
    with pytest.raises(RankFailure, match="^rank 0: the gather of every rank's RNG states timed out") as caught:
        with rt.collective("the checkpoint save of step 3"), rt.collective("the gather of every rank's RNG states"):
            raise RuntimeError(GLOO_TIMEOUT)
    assert "checkpoint save" not in str(caught.value)  # the innermost name only
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_collective_passes_other_errors_and_single_process_runs_through_untouched():
    with pytest.raises(ValueError), two_ranks().collective("a barrier"):
        raise ValueError("timed out")  # not a transport error type
    one = Runtime(device=torch.device("cpu"), dtype=None)
    with pytest.raises(RuntimeError, match="Timed out"), one.collective("a barrier"):
        raise RuntimeError(GLOO_TIMEOUT)
