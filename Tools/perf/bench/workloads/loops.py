def run():
    x = 0.0
    y = 1.5
    for i in range(2_000_000):
        x = x * 0.5 + y * 1.25 - i * 0.001
        y = y + 0.25
