"""`dots-merge demo`: the whole pipeline offline on a toy trio it trains itself."""
