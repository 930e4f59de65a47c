"""What every part of the Kubernetes backend works with, in one object (built once by the backend)."""

from __future__ import annotations

from dataclasses import dataclass

import kubernetes.client

from keruta_prefect.backends.kubernetes.follow import Followers
from keruta_prefect.backends.kubernetes.watch import WatchTuning
from keruta_prefect.settings import KerutaSettings
from keruta_prefect.store import Store

BACKEND_NAME = "kubernetes"


@dataclass(frozen=True)
class Kube:
    """The cluster connection (one ApiClient and its two API groups), the settings, the store the agents'
    reports are read from, the timings, and the log followers that outlive ``wait()``."""

    settings: KerutaSettings
    store: Store
    api: kubernetes.client.ApiClient
    batch: kubernetes.client.BatchV1Api
    core: kubernetes.client.CoreV1Api
    tuning: WatchTuning
    followers: Followers

    @classmethod
    def connect(cls, settings: KerutaSettings, store: Store, api: kubernetes.client.ApiClient,
                tuning: WatchTuning) -> Kube:
        return cls(settings=settings, store=store, api=api, batch=kubernetes.client.BatchV1Api(api),
                   core=kubernetes.client.CoreV1Api(api), tuning=tuning, followers=Followers())
