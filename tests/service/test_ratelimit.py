from incontext.service.ratelimit import RateLimiter


def test_fixed_window_per_key():
    now = [100.0]
    limiter = RateLimiter(2, window_s=60, clock=lambda: now[0])
    assert [limiter.hit("a").remaining for _ in range(2)] == [1, 0]
    refused = limiter.hit("a")
    assert not refused.allowed and refused.headers()["Retry-After"] == "60"
    assert limiter.hit("b").allowed  # keys are independent
    now[0] += 45
    assert limiter.hit("a").reset_s == 15
    now[0] += 15
    assert limiter.hit("a").allowed  # a new window
