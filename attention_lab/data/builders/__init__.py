"""Local tensorflow-datasets builders for the offline default data.

They live in a package because TFDS looks builders' resources up through
package metadata. Each prepares from data that ships with a Python package or
is generated with a fixed seed: nothing is downloaded.
"""
