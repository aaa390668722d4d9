"""Requests encoded by clients built against an earlier parley.v1 still decode the same.

FollowResponse used to take GetResponseRequest (response_id = 1, starting_after = 4); it now has
FollowResponseRequest with those numbers. buf breaking cannot see through a change of request
type (buf.yaml ignores that rule for service.proto), so this test is the proof.
"""

from parley.v1 import service_pb2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(number: int, text: str) -> bytes:
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def test_an_earlier_follow_request_decodes_into_the_new_message():
    earlier = _string(1, "resp_abc") + _varint(4 << 3) + _varint(7)  # GetResponseRequest as sent before
    request = service_pb2.FollowResponseRequest.FromString(earlier)
    assert request.response_id == "resp_abc"
    assert request.HasField("starting_after") and request.starting_after == 7


def test_the_rest_requests_keep_the_numbers_of_the_messages_they_replaced():
    pairs = [(service_pb2.HttpGetResponseRequest, {"response_id": 1, "include": 2, "stream": 3,
                                                  "starting_after": 4, "include_obfuscation": 5}),
             (service_pb2.HttpCancelResponseRequest, {"response_id": 1, "body": 2}),
             (service_pb2.HttpListInputItemsRequest, {"response_id": 1, "after": 2, "before": 3, "limit": 4,
                                                     "order": 5, "include": 6})]
    for message, numbers in pairs:
        assert {field.name: field.number for field in message.DESCRIPTOR.fields} == numbers
