"""Durability helper shared by the writers that rename a finished file into place (data
downloads, training checkpoints): after ``os.replace`` the rename itself lives in the
folder's metadata, which must be fsynced too for the new name to survive a power cut."""
import os


def fsync_dir(path: str) -> None:
    """fsync a folder; a no-op where folders cannot be opened (Windows) or fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
