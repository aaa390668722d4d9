from parley.ids import AFFINITY_HEX, affinity_tag, new_id, new_response_id


def test_a_continuation_carries_its_chains_tag_and_fresh_randomness():
    root = new_response_id()
    second = new_response_id(root)
    third = new_response_id(second)
    assert root.startswith("resp_") and len(root) == len(new_id("resp")) == 5 + 48
    assert affinity_tag(root) == affinity_tag(second) == affinity_tag(third) == root[5:5 + AFFINITY_HEX]
    assert len({root, second, third}) == 3 and second[5 + AFFINITY_HEX:] != third[5 + AFFINITY_HEX:]
    assert affinity_tag(new_response_id()) != affinity_tag(root)  # a new chain, a new tag


def test_an_id_of_another_shape_starts_a_new_tag():
    assert affinity_tag("resp_xyz") is None
    assert affinity_tag(new_response_id("resp_not-hex-at-all")) is not None
