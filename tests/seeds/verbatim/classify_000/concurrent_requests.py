tasks = [
    client.classify(texts=[text], capabilities=["classification"])
    for text in my_texts
]
results = await asyncio.gather(*tasks)
