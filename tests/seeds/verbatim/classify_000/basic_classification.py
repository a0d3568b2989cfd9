import aiohttp

async def classify():
    async with aiohttp.ClientSession() as session:
        async with session.post(
            "http://localhost:8000/classify",
            json={
                "texts": ["The training was excellent!"],
                "capabilities": ["classification"]
            }
        ) as response:
            result = await response.json()
            print(result)
