"""One source of truth for the create request's fields: the validator accepts exactly the typed
request's fields plus the REST-only streaming ones, so a field added to one side cannot be
forgotten on the other."""

from parley.service.validation import KNOWN_FIELDS, REST_ONLY_FIELDS
from parley.v1 import responses_pb2


def test_the_validator_knows_exactly_the_proto_fields_and_the_rest_only_ones():
    typed = {field.name for field in responses_pb2.CreateResponseRequest.DESCRIPTOR.fields}
    assert KNOWN_FIELDS == typed | REST_ONLY_FIELDS
    assert not typed & REST_ONLY_FIELDS
