"""Runs the research team's ClientApp in a child process with no network and a narrow view
of the file system; talks to it over an inherited pipe with Flower's protobufs."""
