"""The folded MoE layer on 2 and 4 ranks (the 8-rank property tests live beside this file)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_moe_parallel import check_moe, experts_for, moe_cases

from foldmesh.testing import RankPool, folds


@pytest.fixture(scope="module", params=[2, 4])
def pool(request):
    with RankPool(request.param, timeout=120) as p:
        yield p


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), case=moe_cases, dispatcher=st.sampled_from(["alltoall", "allgather"]),
       cf=st.sampled_from([None, 1.0]), pad=st.booleans())
def test_small_worlds_match_reference(pool, data, case, dispatcher, cf, pad):
    fold = data.draw(folds(pool.world_size), label="fold")
    E = data.draw(experts_for(fold), label="E")
    pool.run(check_moe, fold, E=E, cf=cf, policy="probs", pad=pad and cf is not None,
             dispatcher=dispatcher, **case)
