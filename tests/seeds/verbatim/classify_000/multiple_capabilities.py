result = await client.classify(
    texts=["Text 1", "Text 2"],
    capabilities=["classification", "recommendations", "alerts"]
)
