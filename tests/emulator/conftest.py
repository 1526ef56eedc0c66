"""Fixtures for the emulator tests: started emulators and real-SDK clients pointed at them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tencentcloud.common import credential
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile

from procpoll.emulator import Emulator


@pytest.fixture
def start_emulator() -> Iterator[Callable[..., Emulator]]:
    """Factory: `start_emulator(**kwargs)` returns a started Emulator, stopped at teardown."""
    started: list[Emulator] = []

    def start(**kwargs: Any) -> Emulator:
        kwargs.setdefault("hold_s", 0.2)
        emulator = Emulator(**kwargs).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emu(start_emulator: Callable[..., Emulator]) -> Emulator:
    """A started emulator with a 0.2 s hold and the default 30 s confirm window."""
    return start_emulator()


def make_client(
    emulator: Emulator,
    *,
    secret_id: str | None = None,
    secret_key: str | None = None,
    token: str | None = None,
    timeout_s: float = 10,
    method: str = "POST",
) -> CommonClient:
    """A real SDK CommonClient for vod 2018-07-17 speaking plain HTTP to `emulator`."""
    cred = credential.Credential(
        secret_id or emulator.secret_id, secret_key or emulator.secret_key, token
    )
    http = HttpProfile(
        protocol="http", endpoint=emulator.endpoint, reqTimeout=timeout_s, reqMethod=method
    )
    return CommonClient("vod", "2018-07-17", cred, "", profile=ClientProfile(httpProfile=http))


@pytest.fixture
def client_for() -> Callable[..., CommonClient]:
    """Factory: `client_for(emulator, **options)`, see `make_client`."""
    return make_client


@pytest.fixture
def vod(emu: Emulator) -> CommonClient:
    """A real SDK client signed with `emu`'s credentials."""
    return make_client(emu)
