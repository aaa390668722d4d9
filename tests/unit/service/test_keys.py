"""API keys: stored hashed, checked per request, cached briefly, revocable."""

import pytest
from parley.errors import ApiError
from parley.service.keys import (
    DEFAULT_PROJECT,
    KEY_CACHE_SECONDS,
    Authenticator,
    bearer_token,
    check_project_name,
    create_key,
    key_hash,
)
from parley.store.sqlite import SqliteStore


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
async def store(tmp_path):
    store = SqliteStore(tmp_path / "k.sqlite3")
    await store.open()
    yield store
    await store.close()


def test_bearer_tokens_are_read_from_the_header():
    assert bearer_token("Bearer sk-1") == "sk-1" and bearer_token("bearer  sk-1 ") == "sk-1"
    assert bearer_token(None) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None


def test_project_names_are_plain():
    assert check_project_name("team-a_1.x") == "team-a_1.x"
    for bad in ("", "a b", "x" * 65, "é"):
        with pytest.raises(ValueError):
            check_project_name(bad)


async def test_without_any_key_auth_is_off_and_everything_is_the_default_project(store):
    assert await Authenticator(store).project_of(None) == DEFAULT_PROJECT


async def test_a_stored_key_names_its_project_and_only_its_hash_is_stored(store):
    key, record = await create_key(store, "team-a", "ci")
    auth = Authenticator(store)
    assert await auth.project_of(f"Bearer {key}") == "team-a"
    [listed] = await store.list_keys()
    assert listed.id == record.id and listed.project == "team-a" and listed.last_used_at is not None
    raw = b"".join(path.read_bytes() for path in store.path.parent.iterdir())  # the file and its WAL
    assert key.encode() not in raw and key_hash(key) in raw


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic xyz"])
async def test_a_missing_key_is_a_401_in_openai_shape(store, header):
    await create_key(store, "team-a")
    with pytest.raises(ApiError) as refused:
        await Authenticator(store).project_of(header)
    assert refused.value.kind.http_status == 401 and refused.value.code is None
    assert refused.value.to_openai()["error"]["type"] == "invalid_request_error"


async def test_a_wrong_key_is_a_401_invalid_api_key_that_does_not_echo_it(store):
    await create_key(store, "team-a")
    with pytest.raises(ApiError) as refused:
        await Authenticator(store).project_of("Bearer sk-parley-wrong")
    assert refused.value.code == "invalid_api_key" and "wrong" not in refused.value.message


async def test_a_revoked_key_stops_working_within_the_cache_time(store):
    key, record = await create_key(store, "team-a")
    clock = Clock()
    auth = Authenticator(store, clock=clock)
    assert await auth.project_of(f"Bearer {key}") == "team-a"
    assert await store.revoke_key(record.id) and not await store.revoke_key("key_nope")
    assert await auth.project_of(f"Bearer {key}") == "team-a"  # cached
    clock.now += KEY_CACHE_SECONDS
    with pytest.raises(ApiError):
        await auth.project_of(f"Bearer {key}")


async def test_the_bootstrap_key_is_the_default_project_and_turns_auth_on(store):
    auth = Authenticator(store, bootstrap_key="sk-boot")
    assert await auth.project_of("Bearer sk-boot") == DEFAULT_PROJECT
    with pytest.raises(ApiError):
        await auth.project_of(None)


async def test_a_first_key_created_while_serving_turns_auth_on_within_the_cache_time(store):
    clock = Clock()
    auth = Authenticator(store, clock=clock)
    assert await auth.project_of(None) == DEFAULT_PROJECT
    key, _ = await create_key(store, "team-a")
    clock.now += KEY_CACHE_SECONDS
    with pytest.raises(ApiError):
        await auth.project_of(None)
    assert await auth.project_of(f"Bearer {key}") == "team-a"


async def test_revoking_every_key_leaves_auth_on(store):
    _, record = await create_key(store, "team-a")
    await store.revoke_key(record.id)
    with pytest.raises(ApiError):
        await Authenticator(store).project_of(None)
