"""`lowbit bench`: load an OpenAI-compatible server and measure it.

    datasets.py  random prompts of exact token lengths, or ShareGPT
    client.py    one streamed request, timed per chunk
    runner.py    arrivals (Poisson / gamma / all at once) under a concurrency limit
    metrics.py   TPOT, percentiles, throughput, goodput (pure functions)
    report.py    text summary, JSON, PNG;  cli.py  the verb
"""
