"""job checkpoints and the workers' reports

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('worker', sa.String(length=200), nullable=True))
        batch.add_column(sa.Column('checkpoint_key', sa.String(length=300), nullable=True))
        batch.add_column(sa.Column('checkpoint_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('checkpoint_step', sa.Integer(), nullable=True))
    op.create_table('workers',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('cuda_devices', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('workers')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('checkpoint_step')
        batch.drop_column('checkpoint_sha256')
        batch.drop_column('checkpoint_key')
        batch.drop_column('worker')
