"""`cosctl report`: run folders read once (`runs`), their figures (`plots`) and report.md (`write`).

May import: `cosctl.common`.
"""
