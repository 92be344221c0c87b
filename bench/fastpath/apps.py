from django.apps import AppConfig


class FastpathBenchConfig(AppConfig):
    name = "bench.fastpath"
    label = "fastpath_bench"
