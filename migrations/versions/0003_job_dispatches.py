"""job_dispatches: the outbox between a committed job and the broker

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_dispatches',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('queue', sa.String(length=200), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tries', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id')
    )
    op.create_index('ix_job_dispatches_due_at', 'job_dispatches', ['due_at'])


def downgrade() -> None:
    op.drop_index('ix_job_dispatches_due_at', table_name='job_dispatches')
    op.drop_table('job_dispatches')
