"""Adapters that plug kvstash into inference engines.

    kvstash.integrations.vllm     KvstashConnector, a vLLM KV connector (V1 interface)
    kvstash.integrations.sglang   KvstashHiCacheStorage, an SGLang HiCache L3 storage backend

Each adapter imports its engine lazily (or not at all), so importing this package never needs
the engine installed.
"""
